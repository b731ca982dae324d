"""Perplexity of a language model on packed data, and the unigram baseline to read it against.

`hope-hf eval` (perplexity) and `hope-hf train` (its final report) use these; they work on any causal LM.
"""

from __future__ import annotations

import math

__all__ = ["evaluate_perplexity", "unigram_baseline"]


def evaluate_perplexity(model, tokenizer, dataset, batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity of ``model`` on a packed dataset (``input_ids``/``labels``), through the shipped metric module."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from ..metrics import load_perplexity_metric

    metric = load_perplexity_metric()
    device = next(model.parameters()).device
    model.eval()
    n = len(dataset)
    for start in tqdm(range(0, n, batch_size), desc="Evaluating", disable=not progress, unit="batch"):
        rows = dataset[start : start + batch_size]
        input_ids = torch.tensor(rows["input_ids"], device=device)
        labels = torch.tensor(rows["labels"], device=device)
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits.float()
        nll = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
        ).sum(dim=1)
        counts = (labels[:, 1:] != -100).sum(dim=1)
        metric.add_batch(nll_sum=nll.tolist(), num_tokens=counts.tolist())
    return metric.compute()


def unigram_baseline(train_ids, eval_ids, vocab_size: int) -> float:
    """Perplexity on ``eval_ids`` (predicted positions: all but the first of each sequence) of the add-one-smoothed
    unigram distribution of ``train_ids``; both are lists of token-id sequences."""
    import numpy as np

    counts = np.zeros(vocab_size, dtype=np.float64)
    for seq in train_ids:
        counts += np.bincount(np.asarray(seq[1:], dtype=np.int64), minlength=vocab_size)[:vocab_size]
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    nll, n = 0.0, 0
    for seq in eval_ids:
        tgt = np.asarray(seq[1:], dtype=np.int64)
        nll -= float(logp[tgt].sum())
        n += tgt.size
    return math.exp(nll / n)
