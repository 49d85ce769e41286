"""Dataset statistics of regression tasks: a first, hand-made task embedding.

Every feature is computed from the support set alone, so it is available at meta-test time
without peeking at query labels. Input is the task-set long table of `components.tasksets`
(columns ``task_id, role, x, y``; other columns, such as the true amplitude, are ignored).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.spatial.distance import cdist

ROLES = ("support", "query")
FEATURE_COLUMNS = (
    "n_support", "n_query", "x_mean", "x_std", "y_mean", "y_std", "y_min", "y_max", "y_range",
    "corr_xy", "slope", "sin_amplitude", "sin_phase", "sin_rmse",
)
METRICS = ("cosine", "euclidean", "manhattan")
SIMILARITIES = ("cosine",)  # higher is closer; the others are distances (0 on the diagonal)


@dataclass(frozen=True)
class TaskFeatureExtractor:
    """Per-task support-set statistics; `transform` returns (n_tasks, len(columns))."""

    columns: tuple[str, ...] = FEATURE_COLUMNS  # which features to return, in this order

    def __post_init__(self):
        unknown = [c for c in self.columns if c not in FEATURE_COLUMNS]
        if unknown:
            raise ValueError(f"unknown feature columns {unknown}; known: {FEATURE_COLUMNS}")

    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        """Features indexed by task_id (sorted), one column per name in `self.columns`.

        Stds are population stds (ddof=0) so a 1-shot task gets 0. corr_xy and slope are 0 where
        x or y is constant; sin_* come from the least-squares fit y ~ a sin x + b cos x, with
        amplitude sqrt(a^2 + b^2) and phase atan2(b, a), so y = A sin(x + phi) gives (A, phi).
        """
        support = _support_rows(df)
        grouped = support.groupby("task_id", sort=True)
        features = pd.concat([_moments(support, grouped), _sincos_fit(support, grouped)], axis=1)
        features.insert(1, "n_query", _query_counts(df, features.index))
        return features.loc[:, list(self.columns)]


def pairwise_similarity(features: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Task x task matrix (n_tasks, n_tasks) on column-standardized features.

    features: (n_tasks, n_features), e.g. `TaskFeatureExtractor().transform(...)`. Columns are
    z-scored (constant columns become 0). "cosine" gives similarities in [-1, 1] (0 for an
    all-zero row); "euclidean" and "manhattan" give distances (0 on the diagonal).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    z = _standardize(features.to_numpy(dtype=float))
    if metric == "cosine":
        matrix = np.nan_to_num(1.0 - cdist(z, z, "cosine"), nan=0.0)
    else:
        matrix = cdist(z, z, "euclidean" if metric == "euclidean" else "cityblock")
    return pd.DataFrame(matrix, index=features.index, columns=features.index)


def _support_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Support rows (task_id, x, y), checked for columns, roles and finite values."""
    missing = [c for c in ("task_id", "role", "x", "y") if c not in df.columns]
    if missing:
        raise ValueError(f"task table lacks columns {missing}")
    bad_roles = set(df["role"].unique()) - set(ROLES)
    if bad_roles:
        raise ValueError(f"unknown roles {sorted(bad_roles)} in column 'role'; expected {ROLES}")
    no_support = set(df["task_id"]) - set(df.loc[df["role"] == "support", "task_id"])
    if no_support:
        raise ValueError(f"tasks without support rows: {sorted(no_support)[:10]}")
    support = df.loc[df["role"] == "support", ["task_id", "x", "y"]].astype({"x": float, "y": float})
    if not np.isfinite(support[["x", "y"]].to_numpy()).all():
        raise ValueError("support rows have nan or inf in x or y")
    return support


def _moments(support: pd.DataFrame, grouped) -> pd.DataFrame:
    """Counts, means, stds, range, Pearson correlation and OLS slope, per task."""
    stats = grouped.agg(n_support=("x", "size"), x_mean=("x", "mean"), y_mean=("y", "mean"),
                        x_min=("x", "min"), x_max=("x", "max"), y_min=("y", "min"), y_max=("y", "max"))
    # Centre first: sums of centred products avoid E[x^2] - E[x]^2 cancellation.
    xc = support["x"] - grouped["x"].transform("mean")
    yc = support["y"] - grouped["y"].transform("mean")
    sums = pd.DataFrame({"sxx": xc * xc, "syy": yc * yc, "sxy": xc * yc,
                         "task_id": support["task_id"]}).groupby("task_id", sort=True).sum()
    # Test constancy on min == max: a centred constant can leave ~1e-33 in sxx, not 0.
    x_varies, y_varies = stats["x_max"] > stats["x_min"], stats["y_max"] > stats["y_min"]
    stats["x_std"] = np.sqrt(sums["sxx"] / stats["n_support"]).where(x_varies, 0.0)
    stats["y_std"] = np.sqrt(sums["syy"] / stats["n_support"]).where(y_varies, 0.0)
    stats["y_range"] = stats["y_max"] - stats["y_min"]
    corr = sums["sxy"] / np.sqrt(sums["sxx"] * sums["syy"])
    stats["corr_xy"] = corr.clip(-1.0, 1.0).where(x_varies & y_varies, 0.0)
    stats["slope"] = (sums["sxy"] / sums["sxx"]).where(x_varies, 0.0)
    return stats.drop(columns=["x_min", "x_max"])


EXACT_FIT = 1e-9  # a fit's rmse at most this fraction of the targets' rms is exact (float64 rounding: ~1e-16)


def _sincos_fit(support: pd.DataFrame, grouped) -> pd.DataFrame:
    """Batched least squares y ~ a sin x + b cos x per task: amplitude, phase, residual rmse."""
    s, c, y = np.sin(support["x"]), np.cos(support["x"]), support["y"]
    sums = pd.DataFrame({"ss": s * s, "cc": c * c, "sc": s * c, "ys": y * s, "yc": y * c,
                         "task_id": support["task_id"]}).groupby("task_id", sort=True).sum()
    gram = np.stack([sums[["ss", "sc"]].to_numpy(), sums[["sc", "cc"]].to_numpy()], axis=1)  # (T, 2, 2)
    rhs = sums[["ys", "yc"]].to_numpy()[:, :, None]  # (T, 2, 1)
    coef = (np.linalg.pinv(gram, hermitian=True) @ rhs)[:, :, 0]  # (T, 2); min-norm if singular
    row = grouped.ngroup().to_numpy()  # task position of every support row
    resid = y.to_numpy() - coef[row, 0] * s.to_numpy() - coef[row, 1] * c.to_numpy()
    count = np.bincount(row)
    rmse, y_rms = (np.sqrt(np.bincount(row, weights=v ** 2) / count) for v in (resid, y.to_numpy()))
    # a residual at float rounding of y (~1e-16 relative) is an exact fit: 0, not noise that standardising
    # would blow up to the weight of every real feature in the similarities
    rmse = np.where(rmse <= EXACT_FIT * y_rms, 0.0, rmse)
    return pd.DataFrame({"sin_amplitude": np.hypot(coef[:, 0], coef[:, 1]),
                         "sin_phase": np.arctan2(coef[:, 1], coef[:, 0]),
                         "sin_rmse": rmse}, index=sums.index)


def _query_counts(df: pd.DataFrame, task_ids: pd.Index) -> np.ndarray:
    counts = df.loc[df["role"] == "query"].groupby("task_id").size()
    return counts.reindex(task_ids, fill_value=0).to_numpy()


def _standardize(x: np.ndarray) -> np.ndarray:
    """Z-score the columns of x (n, f); constant columns become 0."""
    if not np.isfinite(x).all():
        raise ValueError("features contain nan or inf")
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


EPISODE_FEATURES = ("n_way", "k_shot", "pixel_mean", "pixel_std", "ink_fraction", "within_class_distance",
                    "between_class_distance")


def episode_features(x_spt: torch.Tensor, y_spt: torch.Tensor) -> pd.DataFrame:
    """Dataset statistics of image episodes from their support sets only.

    x_spt (T, N*K, C, H, W), y_spt (T, N*K) labels 0..N-1. Distances are euclidean in pixel space:
    within = mean distance of an example to its class mean, between = mean distance between class means.
    Returns (T, len(EPISODE_FEATURES)) indexed by episode position.
    """
    flat, geometry = _class_geometry(x_spt, y_spt)
    return pd.DataFrame({
        **geometry, "pixel_mean": flat.mean((1, 2)).numpy(), "pixel_std": flat.std((1, 2)).numpy(),
        "ink_fraction": (flat > 0.5).double().mean((1, 2)).numpy(),
    })[list(EPISODE_FEATURES)].rename_axis("episode")


def _class_geometry(x_spt: torch.Tensor, y_spt: torch.Tensor) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """(the support examples flattened, (T, N*K, P) float64; per episode n_way, k_shot, within / between / min
    between class distances): euclidean, within = mean distance of an example to its class mean, between = mean
    distance between two class means, min between = the closest two."""
    n_tasks, n_examples = y_spt.shape
    n_way = int(y_spt.max()) + 1
    flat = x_spt.reshape(n_tasks, n_examples, -1).double()
    onehot = torch.nn.functional.one_hot(y_spt, n_way).double()  # (T, NK, N)
    counts = onehot.sum(1)  # (T, N)
    means = onehot.transpose(1, 2) @ flat / counts[..., None]  # (T, N, P)
    apart = torch.cdist(means, means)  # (T, N, N), 0 on the diagonal
    closest = (apart + torch.diag(torch.full((n_way,), torch.inf, dtype=flat.dtype))).flatten(1).min(1).values
    return flat, {"n_way": np.full(n_tasks, n_way), "k_shot": counts.min(1).values.numpy(),
                  "within_class_distance": (flat - onehot @ means).norm(dim=-1).mean(1).numpy(),
                  "between_class_distance": (apart.sum((1, 2)) / (n_way * (n_way - 1))).numpy(),
                  "min_between_class_distance": closest.numpy()}


EMBEDDING_FEATURES = ("n_way", "k_shot", "within_class_distance", "between_class_distance",
                      "min_between_class_distance", "embedding_norm")


def embedding_features(z_spt: torch.Tensor, y_spt: torch.Tensor) -> pd.DataFrame:
    """Statistics of episodes given as feature vectors (sentence embeddings, a backbone's features), from their
    support sets only: the geometry of the classes, not pixel statistics (`episode_features`), which on a feature
    vector mean nothing (a unit-norm sentence embedding has no 'ink', and its std follows from its mean).

    z_spt (T, N*K, D), y_spt (T, N*K) labels 0..N-1. Euclidean distances in the feature space: within = mean
    distance of an example to its class mean (0 at 1-shot), between / min between = mean / smallest distance
    between two class means (how far apart the hardest pair is), embedding_norm = mean L2 norm of an example.
    Returns (T, len(EMBEDDING_FEATURES)) indexed by episode position."""
    flat, geometry = _class_geometry(z_spt, y_spt)
    return pd.DataFrame({**geometry, "embedding_norm": flat.norm(dim=-1).mean(1).numpy()})[
        list(EMBEDDING_FEATURES)].rename_axis("episode")


MODEL_FEATURES = ("start_loss", "start_accuracy", "grad_norm")


def start_features(model: torch.nn.Module, params: dict[str, torch.Tensor], x_spt, y_spt: torch.Tensor
                   ) -> pd.DataFrame:
    """Model features of classification episodes at a starting point, from their support sets only.

    x_spt (T, B, ...) inputs of `model` (images, or utterance rows), y_spt (T, B) labels. Per episode: the
    cross-entropy and accuracy of model with `params` swapped in (other weights its own), and the L2 norm of
    the support-loss gradient with respect to params (how far the first inner step moves). One episode at a
    time: a batch norm over the support set makes the episode the unit. Returns (T, len(MODEL_FEATURES)).
    """
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    rows = []
    for x, y in zip(x_spt, y_spt):
        logits = torch.func.functional_call(model, params, (x,))
        loss = torch.nn.functional.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        norm = torch.sqrt(sum(g.square().sum() for g in grads if g is not None))
        rows.append((loss.item(), (logits.argmax(-1) == y).double().mean().item(), float(norm)))
    return pd.DataFrame(rows, columns=list(MODEL_FEATURES)).rename_axis("episode")
