"""Perplexity of a causal LM on plain text (used by the examples, the CLI and the tests)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(model, tokenizer, text: str, block_size: int = 512, max_blocks: int | None = None,
               progress: bool = False) -> float:
    """Token-level perplexity of ``text`` under ``model``, over consecutive non-overlapping blocks.

    Every block is scored on its own (no context carried over), so the number is comparable between a dense
    and a sparse model but not with sliding-window figures from elsewhere.

    Example:
        >>> perplexity(model, tokenizer, open("heldout.txt").read(), block_size=256)  # doctest: +SKIP
        8.83
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    if ids.numel() < 2:
        raise ValueError("the text is too short to score: it needs at least two tokens")
    device = next(model.parameters()).device
    starts = list(range(0, ids.numel() - 1, block_size))[:max_blocks]
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for start in tqdm(starts, desc="perplexity", disable=not progress):
        block = ids[start : start + block_size].unsqueeze(0).to(device)
        if block.shape[1] < 2:
            continue
        loss = model(block, labels=block).loss.float().item()
        total_nll += loss * (block.shape[1] - 1)
        total_tokens += block.shape[1] - 1
    model.train(was_training)
    return math.exp(total_nll / total_tokens)
