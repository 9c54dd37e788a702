"""Views of a race: the markdown dashboard, progress plots, the race report."""
