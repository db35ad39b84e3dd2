"""Top-k accuracy counts: padded samples are not counted."""
from __future__ import annotations

import torch

from tsm_dist.training.accuracy import topk_counts


def test_topk_counts_skip_padded_samples():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.9, 0.0, 0.1]])
    labels = torch.tensor([1, 2, 1, -1])  # last one is padding
    n, top1, top2 = topk_counts(logits, labels, ks=(1, 2)).tolist()
    assert (n, top1, top2) == (3, 1, 2)
    assert topk_counts(logits[:0], labels[:0]).tolist() == [0, 0, 0]
