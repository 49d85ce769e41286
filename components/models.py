"""Networks whose parameters the meta-learners adapt through `torch.func.functional_call`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """The MAML paper's sinusoid regressor: 1-40-40-1 with ReLU.

    forward: x (..., sizes[0]) -> (..., sizes[-1]); or, task-batched, x (T, B, sizes[0]) -> (T, B, sizes[-1]),
    every weight shared (its own shape) or one per task (T, *shape), e.g. swapped in through `functional_call`
    (what `MetaLearnerConfig(task_batched=True)` runs). A 3-D x with every weight shared is the same function
    either way.
    """

    def __init__(self, sizes: tuple[int, ...] = (1, 40, 40, 1)):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        if x.dim() == 3:
            return self._forward_tasks(x)
        return self.net(x)

    def _forward_tasks(self, x: torch.Tensor) -> torch.Tensor:
        h = x  # (T, B, d)
        for layer in self.net:
            h = _linear_tasks(h, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer(h)
        return h


def _linear_tasks(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h (T, B, in) @ weight.T + bias, weight (out, in) or (T, out, in), bias (out,) or (T, out) -> (T, B, out)."""
    if weight.dim() == 3:
        return torch.baddbmm(bias.unsqueeze(-2), h, weight.mT)  # one batched matmul with the bias folded in
    if bias.dim() == 2:
        return F.linear(h, weight) + bias.unsqueeze(-2)
    return F.linear(h, weight, bias)
