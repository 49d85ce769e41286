"""A learned task embedding: a DeepSets encoder over a support set's backbone features and labels.

    z = normalize(ρ( mean_i φ([f_i, c_i]) ))

f_i (D,) is example i's backbone feature; c_i is either the mean feature of its class ("class_mean": blind
to which class carries which label index, so relabelling an episode's classes leaves z unchanged) or its
one-hot label ("onehot"). The mean over i makes z invariant to the order of the support set (Zaheer et al.
2017). φ and ρ are two-layer ReLU MLPs.

Two training objectives, both aimed at transfer:
  fit_contrastive  InfoNCE (NT-Xent, Chen et al. 2020): episodes drawn from the same group (alphabet,
                   domain) are positives, all other episodes in the batch negatives, so groups between which
                   knowledge transfers, i.e. the same group, sit close together.
  fit_regression   Regress measured transfer gains: gain(s, t) ≈ a - exp(log_b) * ||z_s - z_t||², a, log_b
                   learned with the network, so embedding distance is fitted to predict gain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

LABEL_INPUTS = ("class_mean", "onehot")


@dataclass(frozen=True)
class TaskEncoderConfig:
    feature_dim: int  # D, the width of one example's backbone feature
    n_way: int = 5  # classes per episode; labels are 0..n_way-1
    label_input: str = "class_mean"  # one of LABEL_INPUTS: what is concatenated to each feature
    hidden: int = 128  # width of φ and ρ
    embed_dim: int = 32  # width of z
    normalize: bool = True  # unit-norm z: InfoNCE compares cosines
    seed: int = 0  # weight initialisation

    def __post_init__(self):
        if self.label_input not in LABEL_INPUTS:
            raise ValueError(f"label_input: {self.label_input!r} is not one of {LABEL_INPUTS}")
        for name in ("feature_dim", "n_way", "hidden", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


class TaskEmbeddingNetwork(nn.Module):
    """forward(features (T, M, D), labels (T, M)) -> z (T, embed_dim); or (M, D), (M,) -> (embed_dim,)."""

    def __init__(self, cfg: TaskEncoderConfig):
        super().__init__()
        self.cfg = cfg
        side = cfg.feature_dim if cfg.label_input == "class_mean" else cfg.n_way
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.phi = _mlp(cfg.feature_dim + side, cfg.hidden, cfg.hidden)
            self.rho = _mlp(cfg.hidden, cfg.hidden, cfg.embed_dim)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if features.dim() == 2:
            return self(features[None], labels[None])[0]
        onehot = F.one_hot(labels, self.cfg.n_way).to(features.dtype)  # (T, M, N)
        if self.cfg.label_input == "onehot":
            side = onehot
        else:
            means = onehot.mT @ features / onehot.sum(1).clamp_min(1.0)[..., None]  # (T, N, D)
            side = onehot @ means  # (T, M, D): each example's class mean
        z = self.rho(self.phi(torch.cat([features, side], -1)).mean(1))  # (T, embed_dim)
        return F.normalize(z, dim=-1) if self.cfg.normalize else z


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


@dataclass(frozen=True)
class EncoderTrainConfig:
    steps: int = 500  # optimiser steps
    lr: float = 1e-3  # Adam
    weight_decay: float = 0.0
    batch_groups: int = 8  # contrastive: groups per batch, two episodes each (anchor and positive)
    batch_pairs: int = 32  # regression: (source, target) pairs per batch, one episode of each
    temperature: float = 0.1  # InfoNCE softmax temperature on cosine similarities
    seed: int = 0  # batch sampling

    def __post_init__(self):
        for name in ("steps", "batch_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.batch_groups < 2:
            raise ValueError(f"batch_groups: must be >= 2 (one positive, some negatives), got {self.batch_groups}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")


def info_nce(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over z (2G, E): rows i and i + G are a positive pair, every other row a negative.

    loss = mean_i -log( exp(s_ij / τ) / Σ_{k ≠ i} exp(s_ik / τ) ), s = cosine similarity, j = i's partner.
    """
    g = z.shape[0] // 2
    sim = F.normalize(z, dim=1) @ F.normalize(z, dim=1).T / temperature
    sim = sim.masked_fill(torch.eye(2 * g, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.arange(2 * g, device=z.device).roll(g)
    return F.cross_entropy(sim, partner)


def fit_contrastive(cfg: TaskEncoderConfig, features: torch.Tensor, labels: torch.Tensor, groups: Sequence,
                    train: EncoderTrainConfig = EncoderTrainConfig()) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train a TaskEmbeddingNetwork with InfoNCE; positives are two episodes of the same group.

    features (E, M, D), labels (E, M): E support sets; groups (E,): each episode's group. Every step draws
    min(batch_groups, n_groups) groups without replacement and two distinct episodes of each. Returns the
    state dict (on features' device) and the loss of every step. Deterministic given cfg.seed and train.seed.
    """
    members = [m for m in _members(groups, features.shape[0]).values() if len(m) >= 2]
    if len(members) < 2:
        raise ValueError("groups: need at least two groups with two or more episodes each")
    n_groups = min(train.batch_groups, len(members))
    gen = torch.Generator().manual_seed(train.seed)

    def loss(net: TaskEmbeddingNetwork) -> torch.Tensor:
        picked = [members[g] for g in torch.randperm(len(members), generator=gen)[:n_groups]]
        pairs = [m[torch.randperm(len(m), generator=gen)[:2]] for m in picked]  # (G,) of (2,)
        rows = torch.cat([torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])])
        return info_nce(net(features[rows], labels[rows]), train.temperature)

    net = TaskEmbeddingNetwork(cfg).to(features.device, features.dtype)
    return _fit(net, [], loss, train)


def fit_regression(cfg: TaskEncoderConfig, features: torch.Tensor, labels: torch.Tensor, groups: Sequence,
                   gains: pd.DataFrame, train: EncoderTrainConfig = EncoderTrainConfig()
                   ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train a TaskEmbeddingNetwork so that a - exp(log_b) * ||z_s - z_t||² fits gain(s, t) in squared error.

    features (E, M, D), labels (E, M), groups (E,) as in `fit_contrastive`; gains: source x target DataFrame
    of measured transfer gains, indexed by group; off-diagonal finite entries whose groups both have episodes
    are the training pairs. Each step draws batch_pairs pairs with replacement and one episode of each side.
    Returns the network's state dict (a and log_b left out) and the loss of every step.
    """
    members = _members(groups, features.shape[0])
    pairs = _gain_pairs(gains, list(members))
    sources = [members[s] for s in pairs["source"]]
    targets = [members[t] for t in pairs["target"]]
    gain = torch.tensor(pairs["gain"].to_numpy(dtype=float), dtype=features.dtype, device=features.device)
    net = TaskEmbeddingNetwork(cfg).to(features.device, features.dtype)
    calibration = nn.Parameter(features.new_zeros(2))  # a, log_b
    gen = torch.Generator().manual_seed(train.seed)

    def loss(net: TaskEmbeddingNetwork) -> torch.Tensor:
        idx = torch.randint(len(pairs), (train.batch_pairs,), generator=gen)
        rows_s = torch.stack([_draw(sources[i], gen) for i in idx])
        rows_t = torch.stack([_draw(targets[i], gen) for i in idx])
        z_s, z_t = net(features[rows_s], labels[rows_s]), net(features[rows_t], labels[rows_t])
        predicted = calibration[0] - calibration[1].exp() * (z_s - z_t).square().sum(1)
        return F.mse_loss(predicted, gain[idx.to(gain.device)])

    return _fit(net, [calibration], loss, train)


def _fit(net: TaskEmbeddingNetwork, extra: list[nn.Parameter], loss_fn, train: EncoderTrainConfig
         ) -> tuple[dict[str, torch.Tensor], list[float]]:
    opt = torch.optim.Adam([*net.parameters(), *extra], lr=train.lr, weight_decay=train.weight_decay)
    losses = []
    for _ in range(train.steps):
        opt.zero_grad()
        loss = loss_fn(net)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, losses


def _members(groups: Sequence, n_episodes: int) -> dict:
    """{group: episode rows (k,) int64}, groups in sorted order."""
    groups = np.asarray(groups)
    if groups.shape != (n_episodes,):
        raise ValueError(f"groups: need one group per episode, shape ({n_episodes},), got {groups.shape}")
    return {g: torch.as_tensor(np.flatnonzero(groups == g)) for g in np.unique(groups)}


def _gain_pairs(gains: pd.DataFrame, known) -> pd.DataFrame:
    """Off-diagonal finite (source, target, gain) rows whose groups both have episodes."""
    long = gains.rename_axis(index="source", columns="target").stack().rename("gain").reset_index()
    keep = (long["source"] != long["target"]) & long["source"].isin(known) & long["target"].isin(known)
    pairs = long[keep & np.isfinite(long["gain"].astype(float))].reset_index(drop=True)
    if pairs.empty:
        raise ValueError("gains: no off-diagonal finite pair between groups that have episodes")
    return pairs


def _draw(rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return rows[torch.randint(len(rows), (), generator=gen)]
