"""PyTorch modules shared by the research workers (importable as ``models``)."""
