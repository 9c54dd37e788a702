"""Tokenizers for the fVLM captions: a small BPE for the offline path, the LM's own otherwise.

The offline tokenizer is a byte-pair-encoding model trained with Hugging Face ``tokenizers`` on
the training captions only (Sennrich et al. 2016) and wrapped in ``PreTrainedTokenizerFast``, so
the worker handles both kinds through the same interface (save_pretrained / from_pretrained).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int = 256):
    """Train a BPE on ``captions``; returns a PreTrainedTokenizerFast.

    Words are split SentencePiece-style (``Metaspace``: a word-initial piece carries "▁"), then
    punctuation is split off. Deterministic: the same captions give the same vocabulary, ids and
    merges in every process. (A ``continuing_subword_prefix`` such as "##" would not be: the
    trainer numbers those tokens in hash-map order, which changes from run to run, and the ids
    break ties between merges; huggingface/tokenizers#1794.) Two workers of one race, or a run and
    its resumed attempt, therefore tokenize the captions identically.

    Raises:
        ValueError: if no caption is given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    captions = [c for c in captions if c.strip()]
    if not captions:
        raise ValueError("cannot train a tokenizer on zero captions")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK], show_progress=False
    )
    tok.train_from_iterator(captions, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def load_tokenizer(name_or_path: str, local_files_only: bool = False):
    """``AutoTokenizer.from_pretrained`` (the LM's own tokenizer, or a saved BPE)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)


def encode_captions(
    tokenizer, captions: list[str], max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize captions as ``tokens + [EOS]`` (no BOS: the visual prefix precedes them).

    Captions longer than ``max_tokens`` are truncated to max_tokens - 1 tokens plus EOS.
    Right-padded with the pad id (the EOS id when the tokenizer has no pad token); padding is
    masked out of attention and labels, so its id never matters.

    Returns:
        (ids [B, L] long, mask [B, L] long, 1 on real tokens incl. EOS), L = longest caption.

    Raises:
        ValueError: if the tokenizer has no EOS token or max_tokens < 2.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [
        tokenizer(c, add_special_tokens=False)["input_ids"][: max_tokens - 1]
        + [tokenizer.eos_token_id]
        for c in captions
    ]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask
