"""Training losses (pure torch, unit-tested against hand-computed values)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, p_chosen: torch.Tensor,
                       margin: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss with soft labels, mean over pairs:
    -(p * log sigma(r_c - r_r - m) + (1 - p) * log sigma(r_r - r_c - m)).
    p = 1 gives the usual -log sigma(r_c - r_r); the margin m asks each side to win by at least m."""
    delta = r_chosen - r_rejected
    return -(p_chosen * F.logsigmoid(delta - margin) + (1.0 - p_chosen) * F.logsigmoid(-delta - margin)).mean()
