"""Top-k accuracy as *counts* (valid samples, correct at 1, correct at 5), so that ranks can sum them with
one allreduce; padded samples (label -1) are not counted."""
from __future__ import annotations

import torch

TOPK = (1, 5)


def topk_counts(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = TOPK) -> torch.Tensor:
    """float64 tensor [num_valid, correct@k for k in ks]; samples with label < 0 are padding."""
    valid = labels >= 0
    logits, labels = logits[valid], labels[valid]
    counts = [float(labels.numel())]
    if labels.numel():
        kmax = min(max(ks), logits.shape[1])
        top = logits.topk(kmax, dim=1).indices
        hit = top.eq(labels.unsqueeze(1))
        counts += [float(hit[:, :min(k, kmax)].any(dim=1).sum()) for k in ks]
    else:
        counts += [0.0] * len(ks)
    return torch.tensor(counts, dtype=torch.float64)
