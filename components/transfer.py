"""Does task-embedding distance predict transfer? Distances between groups, rank correlation, nearest source.

Groups are sets of tasks (Omniglot alphabets, CLINC150 domains). A transfer-gain matrix (sources x targets)
holds gain(s, t): the score on target t when adapting from what was learned on s, minus the score from
scratch. An embedding is a DataFrame (n_groups, E) indexed by group (e.g. a group's mean Task2Vec vector).
If distance predicts transfer, Spearman's rho between distance(s, t) and gain(s, t) over the off-diagonal
pairs s != t is negative.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from components.task2vec import DISTANCES, pairwise_distances

RESAMPLE = ("targets", "pairs")
DISTANCE_COLUMNS = ("embedding", "metric", "source", "target", "distance")
CORRELATION_COLUMNS = ("embedding", "metric", "rho", "ci_low", "ci_high", "n_pairs", "resample")


def group_means(embeddings, groups: Sequence) -> pd.DataFrame:
    """A group's embedding as the mean of its episodes': embeddings (T, E), groups (T,) -> (n_groups, E)."""
    values = np.asarray(embeddings.cpu() if torch.is_tensor(embeddings) else embeddings, dtype=float)
    if values.ndim != 2 or len(groups) != len(values):
        raise ValueError(f"embeddings {values.shape} and groups ({len(groups)},): need (T, E) and (T,)")
    return pd.DataFrame(values).groupby(np.asarray(groups), sort=True).mean().rename_axis("group")


def distance_matrix(embeddings: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Group x group distances (n_groups, n_groups) between the rows of embeddings (n_groups, E).

    Distances as in `components.task2vec.pairwise_distances`, on the raw values: standardise hand-made
    features with differently scaled columns first.
    """
    if embeddings.index.has_duplicates:
        raise ValueError("embeddings: the group index has duplicates")
    matrix = pairwise_distances(torch.tensor(embeddings.to_numpy(dtype=float)), metric=metric)
    return pd.DataFrame(matrix.numpy(), index=embeddings.index, columns=embeddings.index)


def distance_table(embeddings: Mapping[str, pd.DataFrame],
                   metrics: Sequence[str] | Mapping[str, Sequence[str]] = DISTANCES) -> pd.DataFrame:
    """Tidy distances: one row per (embedding, metric, source, target), every ordered pair of groups.

    metrics: the same for every embedding, or per embedding name (normalized_cosine needs non-negative
    embeddings such as Task2Vec's; a learned encoder's output is not).
    """
    frames = []
    for name, emb in embeddings.items():
        for metric in metrics[name] if isinstance(metrics, Mapping) else metrics:
            long = distance_matrix(emb, metric).rename_axis(index="source", columns="target").stack()
            frames.append(long.rename("distance").reset_index().assign(embedding=name, metric=metric))
    return pd.concat(frames, ignore_index=True).loc[:, list(DISTANCE_COLUMNS)]


def transfer_pairs(gains: pd.DataFrame) -> pd.DataFrame:
    """(source, target, gain) for every off-diagonal pair with a finite gain; gains (n_sources, n_targets)."""
    long = gains.rename_axis(index="source", columns="target").stack().rename("gain").reset_index()
    long["gain"] = long["gain"].astype(float)
    return long[(long["source"] != long["target"]) & np.isfinite(long["gain"])].reset_index(drop=True)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho of x, y (n,) (scipy's spearmanr); nan when either is constant (scipy would warn)."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def transfer_correlation(gains: pd.DataFrame, distances: pd.DataFrame, n_boot: int = 2000,
                         confidence: float = 0.95, resample: str = "targets", seed: int = 0) -> pd.DataFrame:
    """Spearman's rho between distance(s, t) and gain(s, t) over off-diagonal pairs, per embedding x metric.

    gains: source x target DataFrame; distances: `distance_table` output, which must cover every pair.
    The CI is the percentile bootstrap at `confidence` over n_boot replicates. resample="targets" (default)
    draws target groups with replacement and keeps all their pairs: pairs sharing a target share its
    from-scratch score, so they are not independent. resample="pairs" draws pairs with replacement, treating
    them as independent (narrower). Every embedding x metric sees the same replicates (seeded numpy).
    Returns CORRELATION_COLUMNS, one row per embedding x metric.
    """
    if resample not in RESAMPLE:
        raise ValueError(f"resample: {resample!r} is not one of {RESAMPLE}")
    pairs = transfer_pairs(gains)
    if len(pairs) < 3:
        raise ValueError(f"gains: {len(pairs)} off-diagonal finite pairs; need at least 3")
    replicates = _replicates(pairs, n_boot, resample, np.random.default_rng(seed))
    rows = []
    for (name, metric), table in distances.groupby(["embedding", "metric"], sort=False):
        d = _pair_distances(pairs, table, f"{name}/{metric}")
        boot = np.array([spearman(d[i], pairs["gain"].to_numpy()[i]) for i in replicates])
        low, high = np.nanquantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
        rows.append((name, metric, spearman(d, pairs["gain"].to_numpy()), low, high, len(pairs), resample))
    return pd.DataFrame(rows, columns=list(CORRELATION_COLUMNS))


def within_target_correlation(gains: pd.DataFrame, distances: pd.DataFrame) -> pd.DataFrame:
    """Spearman's rho between distance(s, t) and gain(s, t) over the sources s != t of each target t.

    Ranks sources for one target at a time, so a target's own level (its scratch score, its difficulty) cannot
    drive the correlation as it can over pooled pairs: this asks "which source helps this target most?".
    Returns (embedding, metric, target, rho, n_sources), one row per embedding x metric x target.
    """
    pairs = transfer_pairs(gains)
    rows = []
    for (name, metric), table in distances.groupby(["embedding", "metric"], sort=False):
        d = _pair_distances(pairs, table, f"{name}/{metric}")
        for target, idx in pairs.groupby("target", sort=True).indices.items():
            rows.append((name, metric, target, spearman(d[idx], pairs["gain"].to_numpy()[idx]), len(idx)))
    return pd.DataFrame(rows, columns=["embedding", "metric", "target", "rho", "n_sources"])


def within_target_mean(within: pd.DataFrame) -> pd.DataFrame:
    """The mean over targets of `within_target_correlation`'s rho, per embedding x metric, and how many targets
    entered it: a target's rho is undefined (NaN) when its distances or gains are constant over the sources.
    Returns (embedding, metric, rho_within_target, n_targets_defined, n_targets)."""
    by = within.groupby(["embedding", "metric"], sort=False)["rho"]
    return by.agg(rho_within_target="mean", n_targets_defined="count", n_targets="size").reset_index()


def _replicates(pairs: pd.DataFrame, n_boot: int, resample: str, rng: np.random.Generator) -> list[np.ndarray]:
    """n_boot arrays of pair rows, one per bootstrap replicate."""
    if resample == "pairs":
        return list(rng.integers(len(pairs), size=(n_boot, len(pairs))))
    by_target = [np.asarray(rows) for rows in pairs.groupby("target", sort=True).indices.values()]
    draws = rng.integers(len(by_target), size=(n_boot, len(by_target)))
    return [np.concatenate([by_target[t] for t in draw]) for draw in draws]


def _pair_distances(pairs: pd.DataFrame, table: pd.DataFrame, what: str) -> np.ndarray:
    """distance(source, target) (n_pairs,) for every row of pairs, from one embedding x metric's table."""
    lookup = table.set_index(["source", "target"])["distance"]
    keys = pd.MultiIndex.from_frame(pairs[["source", "target"]])
    missing = keys.difference(lookup.index)
    if len(missing):
        raise ValueError(f"distances: {what} lacks {len(missing)} pairs, e.g. {list(missing[:3])}")
    return lookup.reindex(keys).to_numpy(dtype=float)


def nearest_source(sources: pd.DataFrame, target, metric: str = "normalized_cosine"):
    """The index label of the row of sources (n_sources, E) nearest to target (E,); ties go to the first row.

    For nearest-task initialisation: start the target from the checkpoint of that source group.
    Leave the target's own group out of sources.
    """
    target = torch.tensor(np.asarray(target, dtype=float))[None]
    d = pairwise_distances(torch.tensor(sources.to_numpy(dtype=float)), target, metric)[:, 0]
    return sources.index[int(torch.argmin(d))]


def gain_matrix(scores: pd.DataFrame, reference: str = "scratch") -> pd.DataFrame:
    """Mean gain over `reference`, groups x groups (index source, columns target).

    scores: long (source, target, episode, value); sources that are not targets (pooled, the reference) are
    left out of the rows."""
    mean = scores.groupby(["source", "target"])["value"].mean().unstack("target")
    groups = list(mean.columns)
    return (mean.loc[groups, groups] - mean.loc[reference, groups]).rename_axis(index="source", columns="target")


def zscore_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Each column minus its mean over rows, over its population std; constant columns become 0."""
    return (table - table.mean()) / table.std(ddof=0).replace(0.0, 1.0)


def nearest_sources(embeddings: pd.DataFrame, metric: str = "normalized_cosine") -> pd.DataFrame:
    """For every group (row of embeddings, groups x E), the nearest *other* group: (target, source)."""
    return pd.DataFrame([(g, nearest_source(embeddings.drop(index=g), embeddings.loc[g].to_numpy(), metric))
                         for g in embeddings.index], columns=["target", "source"])
