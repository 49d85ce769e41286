"""Networks whose parameters the meta-learners adapt through `torch.func.functional_call`."""
from __future__ import annotations

from torch import nn


class MLP(nn.Module):
    """The MAML paper's sinusoid regressor: 1-40-40-1 with ReLU.

    forward: x (..., sizes[0]) -> (..., sizes[-1]).
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
        return self.net(x)
