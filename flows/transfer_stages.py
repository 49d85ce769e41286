"""What each stage of the transfer study computes, and its cache keys. No Prefect and no MLflow here.

Groups are sets of classes (Omniglot alphabets of images_background, CLINC150 domains). Each group's classes
are split into training classes and held-out test classes. A source's checkpoint is meta-trained on episodes
of its training classes only; every target is scored on fixed episodes of its test classes, so no checkpoint
has seen a test class. Sources are the groups, "pooled" (meta-trained on every group's training classes:
the meta-learned start, and the image Task2Vec probe) and "scratch" (the shared initialisation, untrained):

    gain(s, t) = accuracy(s -> t) - accuracy(scratch -> t)        (same episodes, same test-time steps)

Per-episode scores are a long table (source, target, episode, value); embeddings per episode are wide tables
(group, episode, e000...); the flows/transfer.py tasks key, cache and log them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from components import metalearners, omniglot, task2vec, text
from components.episodes import (class_members, clean_examples, derive_seed, episodes_from_rows, gather, pixel_keys,
                                 sample_rows)
from components.evaluation import evaluate_init
from components.storage import load_tensors
from components.features import embedding_features, start_features
from components.significance import compare_methods, summarize
from components.task2vec import Task2VecConfig, conv4_task2vec, module_probe
from components.task_encoder import EncoderTrainConfig, TaskEmbeddingNetwork, TaskEncoderConfig, fit_contrastive
from components.training import TrainConfig, meta_train
from components.transfer import (distance_table, gain_matrix, group_means, nearest_sources, transfer_correlation,
                                 within_target_correlation, within_target_mean, zscore_columns)
from flows import report
from flows.cache import StageCache, content_key, write_table
from flows.config import StudyConfig
from flows.families import algorithm_settings, family_for
from flows.plan import input_content, make_plan, without_paths
from flows.versions import code_version


def device(cfg: StudyConfig) -> torch.device:
    if cfg.runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.runtime.device)

POOLED, SCRATCH = "pooled", "scratch"
ITEMS = {"omniglot": "images", "text": "utterances"}  # the items table's name (TextTasks reads "utterances")
PURPOSES = ("val", "test", "embed")  # val / test: training / test classes; embed: every class, embed_shots, no query
EMBEDDING_NAMES = {"task2vec": "Task2Vec", "encoder": "encoder", "features": "features"}  # as printed
STAGES = ("transfer_sets", "transfer_train", "transfer_matrix", "transfer_embeddings", "transfer_encoder",
          "transfer_correlation", "nearest_task")


# what each stage's entry is computed from, recorded with it (rewritten since, the entry is stale): upstream stages
# and whose transfer_train entries ("all" sources or the pooled one)
READS = {"transfer_sets": (("prefix",), ()), "transfer_train": (("transfer_sets", "prefix"), ()),
         "transfer_matrix": (("transfer_sets", "prefix"), "all"),
         "transfer_embeddings": (("transfer_sets", "prefix"), (POOLED,)),
         "transfer_encoder": (("transfer_embeddings",), ()),
         "transfer_correlation": (("transfer_matrix", "transfer_embeddings", "transfer_encoder"), ()),
         "nearest_task": (("transfer_matrix", "transfer_embeddings", "transfer_encoder"), ())}


@dataclass(frozen=True)
class TransferPlan:
    keys: dict[str, str]  # stage -> key (transfer_train: a hash of the per-source keys)
    source_keys: dict[str, str]  # source group's name (config order) or "pooled" -> its transfer_train key


def make_transfer_plan(cfg: StudyConfig) -> TransferPlan:
    """Keys hash the stage's config, its upstream keys and its code (this module, the family's and what they
    import), as flows/plan.py does for the pipeline; the transfer sets also the family's input files. As the
    pipeline's, a training key leaves out the wall-clock budget: a rerun continues a training it stopped.
    Sources are named by group; with `n_groups` (no `groups` listed) the names come from the data."""
    t, pipeline = cfg.transfer, make_plan(cfg)
    code = code_version([__name__, type(pipeline.family).__module__])

    def key(stage: str, section: object, *upstream: str) -> str:
        return content_key({"stage": stage, "config": section, "upstream": [keys[u] for u in upstream],
                            "code": code})

    keys: dict[str, str] = {}
    inputs = input_content(pipeline.inputs)
    family = without_paths(cfg.family.model_dump(), ("path", "split_dir", "split_root"))  # content: in inputs
    keys["transfer_sets"] = key("transfer_sets", {"family": family, "seed": cfg.seed, "inputs": inputs,
                                                  **t.model_dump(
        include={"groups", "n_groups", "test_fraction", "val_episodes", "test_episodes", "embed_episodes",
                 "embed_shots"})})
    data = ("transfer_sets",)
    if cfg.family.kind == "text":
        keys["prefix"] = pipeline.keys["prefix"]  # the pipeline's own prefix entry, shared
        data = ("transfer_sets", "prefix")
    train = {"train": cfg.meta_train.for_algorithm(t.algorithm), "model": cfg.model.model_dump(), "seed": cfg.seed,
             **t.model_dump(include={"algorithm", "iterations"})}
    sources = list(t.groups) or study_groups(cfg, group_classes(cfg))
    source_keys = {s: key("transfer_train", {**train, "source": s}, *data) for s in sources}
    source_keys[POOLED] = key("transfer_train", {**train, "iterations": t.pooled_iterations, "source": POOLED}, *data)
    keys["transfer_train"] = content_key(source_keys)
    keys["transfer_matrix"] = key("transfer_matrix", {"evaluate": cfg.evaluate.model_dump()}, *data, "transfer_train")
    keys["transfer_embeddings"] = key("transfer_embeddings", t.model_dump(
        include={"task2vec_labels", "task2vec_samples", "task2vec_chunk"}), *data, "transfer_train")
    keys["transfer_encoder"] = key("transfer_encoder", t.model_dump(
        include={"encoder_steps", "encoder_hidden", "encoder_dim"}), "transfer_embeddings")
    keys["transfer_correlation"] = key("transfer_correlation", t.model_dump(
        include={"embeddings", "metrics", "n_boot", "resample", "confidence"}),
        "transfer_matrix", "transfer_embeddings", "transfer_encoder")
    keys["nearest_task"] = key("nearest_task", {"significance": cfg.significance.model_dump(),
                                                "embeddings": t.embeddings, "metrics": t.metrics},
                               "transfer_matrix", "transfer_embeddings", "transfer_encoder")
    return TransferPlan(keys, source_keys)


def reads(plan: TransferPlan, stage: str) -> list[tuple[str, str]]:
    """(stage, key) of each entry `stage`'s entry is computed from (READS)."""
    stages, sources = READS[stage]
    return [(s, plan.keys[s]) for s in stages if s in plan.keys] + \
        [("transfer_train", plan.source_keys[s]) for s in (plan.source_keys if sources == "all" else sources)]


def entries(plan: TransferPlan) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """Every entry of the study in computing order: (stage, key, what it reads)."""
    out = [("prefix", plan.keys["prefix"], [])] if "prefix" in plan.keys else []
    for stage in STAGES:
        keys = plan.source_keys.values() if stage == "transfer_train" else [plan.keys[stage]]
        out += [(stage, key, reads(plan, stage)) for key in keys]
    return out


def fully_cached(cfg: StudyConfig, cache: StageCache, plan: TransferPlan) -> bool:
    """Every entry cached, none stale, no source training its budget stopped (a rerun would go on with it)."""
    return all(cache.status(stage, key, read) == "cached" for stage, key, read in entries(plan)) and \
        not unfinished_sources(cfg, cache, plan.source_keys)


def results_text(cfg: StudyConfig, cache: StageCache, plan: TransferPlan) -> str:
    """What the study prints: rho per embedding x metric, then the nearest-task comparison (cached entries)."""
    rho = pd.read_parquet(cache.path("transfer_correlation", plan.keys["transfer_correlation"]) / "rho.parquet")
    path = cache.path("nearest_task", plan.keys["nearest_task"])
    summary = pd.read_parquet(path / "summary.parquet").set_index("method")
    return (f"Spearman rho(distance, transfer gain)\n{rho_text(rho, cfg.transfer.confidence)}\n\n"
            f"{nearest_title(cfg)}\n" + nearest_text(summary, pd.read_parquet(path / "comparisons.parquet"),
                                                      cfg.significance.confidence))


def nearest_text(summary: pd.DataFrame, comparisons: pd.DataFrame, confidence: float = 0.95) -> str:
    lines = [f"{'start':<14} {f'accuracy ({confidence:.0%} CI)':>24}"]
    lines += [f"{m:<14} {r['mean']:>12.4f} +- {r['ci_half']:<8.4f}" for m, r in summary.iterrows()]
    lines += [f"{r.method_a} - {r.method_b}: {r.mean_diff:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}], "
              f"p_holm t {r.p_ttest_holm:.2e}, Wilcoxon {r.p_wilcoxon_holm:.2e}" for r in comparisons.itertuples()]
    return "\n".join(lines)


# ---------------------------------------------------------------- groups, classes and fixed episodes

def group_classes(cfg: StudyConfig) -> dict[str, list[str]]:
    """Every group the family's data holds -> its classes: Omniglot alphabets of images_background -> their
    characters (from the archive's listing; nothing decoded), text domains -> their intents. A missing or
    damaged file raises FileNotFoundError / ValueError naming it."""
    f, by_group = cfg.family, {}
    if f.kind == "omniglot":
        for name in omniglot.archive_members(Path(f.path)):  # images_background/<Alphabet>/<character>/<id>.png
            parts = name.split("/")
            if len(parts) == 4 and parts[0] == "images_background":
                by_group.setdefault(parts[1], set()).add(f"{parts[1]}/{parts[2]}")
    else:
        utterances, _ = family_for(cfg).clean_utterances()
        if "domain" not in utterances:
            raise ValueError(f"transfer: {f.path} gives no domains to group intents by (set family.domain_col)")
        for label, domain in zip(utterances["label"], utterances["domain"]):
            by_group.setdefault(domain, set()).add(label)
    return {g: sorted(c) for g, c in sorted(by_group.items())}


def study_groups(cfg: StudyConfig, by_group: dict[str, list[str]]) -> list[str]:
    """The groups the study compares: transfer.groups (config order), else the first n_groups by name; each
    checked against the data's groups (by_group: `group_classes`)."""
    t, path = cfg.transfer, cfg.family.path
    if missing := [g for g in t.groups if g not in by_group]:
        raise ValueError(f"transfer.groups: {missing} are not groups of {path} (it has {', '.join(by_group)})")
    if not t.groups and len(by_group) < t.n_groups:
        raise ValueError(f"transfer.n_groups: {t.n_groups}, but {path} has only {len(by_group)} groups")
    return list(t.groups) or list(by_group)[:t.n_groups]


def check_sets(cfg: StudyConfig) -> list[str]:
    """What building the transfer sets would reject, from the config and the data alone (no cache, nothing
    decoded): unknown groups, too few groups, a test_fraction leaving a group too few training classes, a
    missing or damaged data file. Returns the study's groups."""
    by_group = group_classes(cfg)
    names = study_groups(cfg, by_group)
    _split_classes(cfg, {g: by_group[g] for g in names})
    return names


def build_sets(cfg: StudyConfig, out: Path) -> dict:
    """Items (images or utterances), each group's training / test classes, and the fixed episodes."""
    names = check_sets(cfg) if cfg.family.kind == "omniglot" else None  # before any image is decoded
    items, group_of = _load_items(cfg)
    by_group: dict[str, list[str]] = {}
    for label, group in sorted(group_of.items()):
        by_group.setdefault(group, []).append(label)
    names = names or study_groups(cfg, dict(sorted(by_group.items())))
    if missing := [g for g in names if g not in by_group]:  # e.g. every drawing dropped as conflicting
        raise ValueError(f"transfer.groups: {missing} have no items left in {cfg.family.path}")
    classes = _split_classes(cfg, {g: by_group[g] for g in names})
    labels = items["label"].to_numpy()
    episodes = pd.concat([_episode_table(cfg, labels, classes, g, i) for i, g in enumerate(names)], ignore_index=True)
    write_table(items, out, ITEMS[cfg.family.kind])
    write_table(classes, out, "classes")
    write_table(episodes, out, "episodes")
    return {"n_groups": len(names), "n_items": len(items), "n_classes": len(classes)}


def _load_items(cfg: StudyConfig) -> tuple[pd.DataFrame, dict[str, str]]:
    """(items with a `label` column, {class: group}). Omniglot: unrotated characters of images_background."""
    f = cfg.family
    if f.kind == "omniglot":
        images = omniglot.load_omniglot(Path(f.path), f.image_size, cfg.transfer.groups or None)
        images = images[images["background"]].sort_values(["character", "drawing"], ignore_index=True)
        items, _ = clean_examples(images.assign(label=images["character"]), pixel_keys(images["pixels"]), "label",
                                  f.conflicting_labels, f"{f.path}: identical drawings: ")
        return items, dict(zip(items["label"], items["alphabet"]))
    utterances, _ = family_for(cfg).clean_utterances()  # what the shared prefix entry was encoded from
    if "domain" not in utterances:
        raise ValueError(f"transfer: {f.path} gives no domains to group intents by (set family.domain_col)")
    return utterances, dict(zip(utterances["label"], utterances["domain"]))


def _split_classes(cfg: StudyConfig, by_group: dict[str, list[str]]) -> pd.DataFrame:
    """group, class_id, role (train / test): a seeded test_fraction of each group's classes is held out."""
    n_way, rng, rows = cfg.family.n_way, np.random.default_rng(cfg.seed), []
    for group, classes in by_group.items():
        n_test = max(n_way, round(cfg.transfer.test_fraction * len(classes)))
        if len(classes) < 2 * n_way:
            raise ValueError(f"transfer.groups: {group!r} has {len(classes)} classes; {n_way}-way episodes need "
                             f"{n_way} training and {n_way} test classes")
        if len(classes) - n_test < n_way:
            raise ValueError(f"transfer.test_fraction: {cfg.transfer.test_fraction} holds out {n_test} of the "
                             f"{len(classes)} classes of {group!r}, leaving {len(classes) - n_test} to train on; "
                             f"{n_way}-way episodes need {n_way}")
        order = rng.permutation(len(classes))
        rows += [(group, classes[i], "test" if rank < n_test else "train") for rank, i in enumerate(order)]
    return pd.DataFrame(rows, columns=["group", "class_id", "role"]).sort_values(["group", "role", "class_id"],
                                                                                 ignore_index=True)


def _episode_table(cfg: StudyConfig, labels: np.ndarray, classes: pd.DataFrame, group: str, index: int
                   ) -> pd.DataFrame:
    """The group's fixed episodes, long: group, purpose, episode, way, slot (< K support), row (an item)."""
    f, t = cfg.family, cfg.transfer
    counts = {"val": t.val_episodes, "test": t.test_episodes, "embed": t.embed_episodes}
    frames = []
    for stream, purpose in enumerate(PURPOSES, start=10):
        mine = classes[classes["group"] == group]
        pool = mine["class_id"] if purpose == "embed" else mine.loc[mine["role"] == ("train" if purpose == "val"
                                                                                     else "test"), "class_id"]
        shots, queries = (t.embed_shots, 0) if purpose == "embed" else (f.k_shot, f.n_query)
        rows, _ = sample_rows(class_members(labels, pool.tolist()), f.n_way, shots, queries, counts[purpose],
                              derive_seed(cfg.seed, index, stream), pool.tolist())
        e, w, k = np.meshgrid(*(np.arange(n) for n in rows.shape), indexing="ij")
        frames.append(pd.DataFrame({"group": group, "purpose": purpose, "episode": e.ravel(), "way": w.ravel(),
                                    "slot": k.ravel(), "row": rows.ravel()}))
    return pd.concat(frames, ignore_index=True)


class GroupTasks:
    """An opened transfer_sets entry: episodes as model inputs, and the family's model, loss and metric."""

    def __init__(self, cfg: StudyConfig, cache: StageCache, keys: dict[str, str], dev: torch.device):
        self.cfg, self.dev = cfg, dev
        self.tables = cache.tables(("transfer_sets", keys["transfer_sets"]),
                                   *([("prefix", keys["prefix"])] if "prefix" in keys else []))
        self.family = family_for(cfg)
        items = self.tables[ITEMS[cfg.family.kind]]
        self.labels = items["label"].to_numpy()
        self.images = (torch.from_numpy(omniglot.pixels_to_array(items)).unsqueeze(1).to(dev)
                       if cfg.family.kind == "omniglot" else None)  # (n_items, 1, s, s); text: rows are inputs
        self.classes = self.tables["classes"]
        self.episodes = self.tables["episodes"]
        self.groups = sorted(self.classes["group"].unique())

    def batch(self, rows: torch.Tensor, k_shot: int | None = None):
        """rows (T, N, K+Q) item ids -> an episode batch of model inputs (images, or the rows themselves)."""
        b = episodes_from_rows(rows, k_shot or self.cfg.family.k_shot)
        b = b.to(self.dev)
        return gather(b, self.images) if self.images is not None else b

    def fixed(self, group: str, purpose: str):
        table = self.episodes[(self.episodes["group"] == group) & (self.episodes["purpose"] == purpose)]
        table = table.sort_values(["episode", "way", "slot"])
        rows = table["row"].to_numpy().reshape(table["episode"].nunique(), self.cfg.family.n_way, -1)  # (T, N, K+Q)
        return self.batch(torch.tensor(rows), self.cfg.transfer.embed_shots if purpose == "embed" else None)

    def sampler(self, groups: list[str], seed: int, meta_batch_size: int) -> Callable[[int], object]:
        """iteration -> a meta-batch of episodes over the training classes of `groups` (a function of it only)."""
        classes = self.classes.loc[self.classes["group"].isin(groups) & (self.classes["role"] == "train"), "class_id"]
        f, pool = self.cfg.family, classes.tolist()
        members = class_members(self.labels, pool)

        def sample(iteration: int):
            rows, _ = sample_rows(members, f.n_way, f.k_shot, f.n_query, meta_batch_size, derive_seed(seed, iteration),
                                  pool)
            return self.batch(torch.from_numpy(rows))

        return sample

    def learner(self, state_path: Path | None = None) -> metalearners.MetaLearner:
        """The shared initialisation (cfg.seed), or the meta-parameters saved at state_path."""
        s = algorithm_settings(self.cfg, self.cfg.transfer.algorithm, self.cfg.seed)
        learner = self.family.learner(self.tables, s.learner, self.dev, self.cfg.seed, s.zero_head)
        if state_path is not None:
            learner.load_state_dict(load_tensors(state_path, self.dev))
        return learner


def source_groups(tasks: GroupTasks, source: str) -> list[str]:
    """The groups a source trains on: a group's name, or "pooled": all of them."""
    return tasks.groups if source == POOLED else [source]


# ---------------------------------------------------------------- meta-training per source

def train_source(cfg: StudyConfig, cache: StageCache, keys: dict[str, str], source: str, out: Path,
                 checkpoint: Path, log: Callable[[int, dict[str, float]], None] | None = None) -> dict:
    """Meta-train from the shared initialisation on the source's training classes; state.pt and history."""
    t, tasks = cfg.transfer, GroupTasks(cfg, cache, keys, device(cfg))
    section, groups = cfg.meta_train.for_algorithm(t.algorithm), source_groups(tasks, source)
    iterations = t.pooled_iterations if source == POOLED else t.iterations
    val = _concat([tasks.fixed(g, "val") for g in groups])
    train_cfg = TrainConfig(meta_lr=section["meta_lr"], iterations=iterations,
                            meta_batch_size=section["meta_batch_size"], val_every=max(1, iterations // 4),
                            checkpoint_every=max(1, iterations // 4), seed=cfg.seed,
                            budget_seconds=None if t.budget_minutes is None else 60 * t.budget_minutes)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    result = meta_train(tasks.learner(), tasks.sampler(groups, cfg.seed, section["meta_batch_size"]), val,
                        train_cfg, checkpoint, log)
    torch.save(result.state, out / "state.pt")
    write_table(result.history, out, "history")
    return {"groups": ",".join(groups), "iterations": iterations, "iterations_run": result.iterations_run,
            "iterations_total": result.iterations_total, "stop_reason": result.stop_reason,
            "best_iteration": result.best_iteration}


def start_notes(cfg: StudyConfig, cache: StageCache, source_keys: dict[str, str]) -> dict[str, str]:
    """Every source start whose scores are not what its name promises: `unfinished_sources` (a budget stopped it)
    and those that kept their initial state (no meta-val loss below iteration 0's: the shared initialisation, which
    is scratch's), as `flows.report.unfinished_training` says them for the pipeline."""
    notes = unfinished_sources(cfg, cache, source_keys)
    for source, key in source_keys.items():
        meta = cache.manifest("transfer_train", key)["meta"] if cache.is_complete("transfer_train", key) else {}
        if f"source {source}" not in notes and meta.get("best_iteration") == 0 and meta.get("iterations_total", 0):
            notes[f"source {source}"] = (f"kept its initial state: no meta-val loss in {meta['iterations_total']} "
                                         f"iterations was below iteration 0's, so it scores as scratch")
    return notes


def unfinished_sources(cfg: StudyConfig, cache: StageCache, source_keys: dict[str, str]) -> dict[str, str]:
    """{"source <name>": "meta-training stopped by the time budget at iteration i of n"} for each cached source
    training that transfer.budget_minutes stopped short (as `flows.report.unfinished_training` for the
    pipeline): the study's gains, rho and nearest-task picks then compare unevenly trained starts."""
    notes = {}
    for source, key in source_keys.items():
        meta = cache.manifest("transfer_train", key)["meta"] if cache.is_complete("transfer_train", key) else {}
        if meta.get("stop_reason") == "budget":
            planned = cfg.transfer.pooled_iterations if source == POOLED else cfg.transfer.iterations
            notes[f"source {source}"] = (f"meta-training stopped by the time budget at iteration "
                                         f"{meta['iterations_total']} of {planned} (a rerun goes on from its "
                                         f"checkpoint)")
    return notes


def _concat(batches: list):
    return type(batches[0])(*(torch.cat(parts) for parts in zip(*batches)))


# ---------------------------------------------------------------- the transfer matrix

def score_matrix(cfg: StudyConfig, cache: StageCache, keys: dict[str, str], source_keys: dict[str, str],
                 out: Path) -> pd.DataFrame:
    """Accuracy after evaluate.steps steps of every source (+ scratch) on every target's test episodes.

    Writes scores (source, target, episode, value) and gains (source x target, mean gain over scratch).
    """
    tasks = GroupTasks(cfg, cache, keys, device(cfg))
    starts = {SCRATCH: None} | {s: cache.path("transfer_train", k) / "state.pt" for s, k in source_keys.items()}
    tests = {g: tasks.fixed(g, "test") for g in tasks.groups}
    steps, frames, learner = cfg.evaluate.steps, [], tasks.learner()
    init = learner.state_dict()
    for source, state in starts.items():  # one model (MiniLM loads in seconds), each source's weights in turn
        learner.load_state_dict(init if state is None else load_tensors(state, tasks.dev))
        for target, test in tests.items():
            acc = evaluate_init(learner, test, steps, cfg.evaluate.chunk, tasks.family.score_fn, [steps])[-1]
            frames.append(pd.DataFrame({"source": source, "target": target, "episode": np.arange(len(acc)),
                                        "value": acc}))
    scores = pd.concat(frames, ignore_index=True)
    write_table(scores, out, "scores")
    write_table(gain_matrix(scores, SCRATCH).reset_index(), out, "gains")
    return scores


def read_gains(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path / "gains.parquet").set_index("source").rename_axis(columns="target")


# ---------------------------------------------------------------- embeddings per episode

def embed_episodes(cfg: StudyConfig, cache: StageCache, keys: dict[str, str], pooled_key: str, out: Path) -> dict:
    """Task2Vec, dataset + model features, and the backbone features of every group's embedding episodes.

    Probe: the pooled meta-learned conv4 (images) or the frozen MiniLM top layers (text). Writes task2vec and
    features (group, episode, columns...), backbone.pt (T, N*K, D) with labels.pt (T, N*K), in table order.
    """
    t, tasks = cfg.transfer, GroupTasks(cfg, cache, keys, device(cfg))
    learner = tasks.learner(cache.path("transfer_train", pooled_key) / "state.pt")
    t2v_cfg = Task2VecConfig(labels=t.task2vec_labels, n_samples=t.task2vec_samples, chunk_size=t.task2vec_chunk,
                             seed=cfg.seed)
    vectors, feats, backbones, labels = [], [], [], []
    for group in tasks.groups:
        batch = tasks.fixed(group, "embed")
        backbone, vector = _probe(cfg, tasks, learner, batch, t2v_cfg)
        index = pd.MultiIndex.from_product([[group], range(len(batch.y_spt))], names=["group", "episode"])
        vectors.append(pd.DataFrame(vector.double().cpu().numpy(), index=index).rename(columns=lambda i: f"e{i:04d}"))
        start = start_features(learner.model, learner.params, batch.x_spt, batch.y_spt)
        feats.append(pd.concat([embedding_features(backbone, batch.y_spt), start], axis=1).set_index(index))
        backbones.append(backbone.float().cpu())
        labels.append(batch.y_spt.cpu())
    write_table(pd.concat(vectors).reset_index(), out, "task2vec")
    write_table(pd.concat(feats).reset_index(), out, "features")
    torch.save(torch.cat(backbones), out / "backbone.pt")
    torch.save(torch.cat(labels), out / "labels.pt")
    return {"task2vec_dim": int(vectors[0].shape[1]), "feature_dim": int(backbones[0].shape[-1])}


def _probe(cfg: StudyConfig, tasks: GroupTasks, learner, batch, t2v_cfg: Task2VecConfig
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(backbone features (T, N*K, D), Task2Vec (T, E)) of the batch's support sets."""
    n_way = cfg.family.n_way
    if cfg.family.kind == "omniglot":
        model = tasks.family.model(tasks.tables).to(tasks.dev)
        model.load_state_dict(learner.state_dict()["params"], strict=False)
        with torch.no_grad():
            backbone = torch.stack([model.blocks(x).flatten(1) for x in batch.x_spt])  # batch norm per support set
        return backbone, conv4_task2vec(model, batch.x_spt, batch.y_spt, n_way, t2v_cfg)
    hidden, mask = tasks.family.prefix(tasks.tables)
    body = text.PooledTop(text.TopEncoder(text.load_minilm()[0], replace(tasks.family.top_config(cfg.seed), lora_r=0)))
    probe = module_probe(body, tuple(n for n, _ in body.named_parameters() if ".head." not in f".{n}"))
    backbone = tasks.family.sentences(tasks.tables).to(tasks.dev)[batch.x_spt]  # the frozen encoder's sentence embeddings
    vectors = [task2vec.task2vec(probe, (hidden[x].float(), mask[x]), y, n_way, replace(t2v_cfg, seed=t2v_cfg.seed + i))
               for i, (x, y) in enumerate(zip(batch.x_spt, batch.y_spt))]
    return backbone, torch.stack(vectors)


# ---------------------------------------------------------------- the learned task encoder

def train_encoder(cfg: StudyConfig, embeddings: Path, out: Path) -> dict:
    """TaskEmbeddingNetwork by InfoNCE (episodes of one group are positives) on the backbone features;
    encoder.pt (state dict, weights_only-loadable), its z per embedding episode, and the loss curve."""
    t = cfg.transfer
    table = pd.read_parquet(embeddings / "features.parquet", columns=["group", "episode"])
    backbone = load_tensors(embeddings / "backbone.pt").double()
    labels = load_tensors(embeddings / "labels.pt")
    enc_cfg = TaskEncoderConfig(feature_dim=backbone.shape[-1], n_way=cfg.family.n_way, hidden=t.encoder_hidden,
                                embed_dim=t.encoder_dim, seed=cfg.seed)
    state, losses = fit_contrastive(enc_cfg, backbone, labels, table["group"].to_numpy(),
                                    EncoderTrainConfig(steps=t.encoder_steps, seed=cfg.seed))
    torch.save(state, out / "encoder.pt")
    net = TaskEmbeddingNetwork(enc_cfg).double()
    net.load_state_dict(load_tensors(out / "encoder.pt"))
    with torch.no_grad():
        z = net(backbone, labels).numpy()
    write_table(table.join(pd.DataFrame(z).rename(columns=lambda i: f"e{i:04d}")), out, "encoder")
    write_table(pd.DataFrame({"step": np.arange(1, len(losses) + 1), "loss": losses}), out, "history")
    return {"encoder_final_loss": losses[-1]}


# ---------------------------------------------------------------- correlation and nearest-task initialisation

def group_embeddings(cfg: StudyConfig, embeddings: Path, encoder: Path) -> dict[str, pd.DataFrame]:
    """Each embedding's group means (n_groups, E); features z-scored per column across groups first."""
    paths = {"task2vec": embeddings / "task2vec.parquet", "features": embeddings / "features.parquet",
             "encoder": encoder / "encoder.parquet"}
    out = {}
    for name in cfg.transfer.embeddings:
        table = pd.read_parquet(paths[name])
        means = group_means(table.drop(columns=["group", "episode"]).to_numpy(dtype=float), table["group"].tolist())
        out[name] = zscore_columns(means) if name == "features" else means  # n_way, k_shot columns become 0
    return out


def correlate(cfg: StudyConfig, matrix: Path, embeddings: Path, encoder: Path, out: Path) -> pd.DataFrame:
    """Distances per embedding x metric, Spearman's rho with distance and its bootstrap CI, and the figures."""
    t, gains = cfg.transfer, read_gains(matrix)
    distances = distance_table(group_embeddings(cfg, embeddings, encoder), {e: t.metrics[e] for e in t.embeddings})
    rho = transfer_correlation(gains, distances, t.n_boot, t.confidence, t.resample, cfg.seed)
    within = within_target_correlation(gains, distances)
    rho = rho.merge(within_target_mean(within), how="left")  # mean over the targets whose rho is defined
    write_table(within, out, "rho_by_target")
    write_table(distances, out, "distances")
    write_table(rho, out, "rho")
    for (name, metric), table in distances.groupby(["embedding", "metric"], sort=False):
        report.plot_heatmap(table.pivot(index="source", columns="target", values="distance"),
                            f"{name}: {metric} distance", out / f"distance_{name}_{metric}.png",
                            f"{metric} distance", distance=True)
    report.plot_heatmap(gains, "transfer gain over scratch (source x target)", out / "transfer_matrix.png",
                        "accuracy gain over scratch")
    plot_rho(rho, out / "rho.png", t.confidence)
    return rho


def plot_rho(rho: pd.DataFrame, path: Path, confidence: float = 0.95) -> Path:
    """Spearman's rho per embedding x metric with its bootstrap CI as error bars; 0 marked."""
    plt = report._pyplot()
    labels = rho["embedding"] + " / " + rho["metric"]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(rho) + 1.2))
    err = np.vstack([rho["rho"] - rho["ci_low"], rho["ci_high"] - rho["rho"]]).clip(0)
    ax.errorbar(rho["rho"], np.arange(len(rho)), xerr=err, fmt="o", capsize=3)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(np.arange(len(rho)), labels)
    ax.set_xlabel(f"Spearman rho(distance, transfer gain), {confidence:.0%} CI")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def nearest_task(cfg: StudyConfig, matrix: Path, embeddings: Path, encoder: Path, out: Path) -> pd.DataFrame:
    """Per target, the nearest other group by Task2Vec normalized cosine (else the first embedding and metric);
    its checkpoint's scores against the meta-learned start (pooled) and scratch, paired over every target's
    episodes (significance: paired t and Wilcoxon, Holm). Writes nearest, comparisons, summary."""
    name, metric = nearest_choice(cfg)
    emb = group_embeddings(cfg, embeddings, encoder)[name]
    picks = nearest_sources(emb, metric).assign(embedding=name, metric=metric)
    scores = pd.read_parquet(matrix / "scores.parquet")
    chosen = scores.merge(picks[["source", "target"]]).assign(method="nearest_task")
    others = scores[scores["source"].isin([POOLED, SCRATCH])].assign(
        method=lambda d: d["source"].map({POOLED: "meta_learned", SCRATCH: SCRATCH}))
    results = pd.concat([chosen, others], ignore_index=True).assign(
        episode=lambda d: d["target"] + ":" + d["episode"].astype(str), metric="accuracy")
    conf = cfg.significance.confidence
    comparisons = compare_methods(results, "accuracy", lower_is_better=False, confidence=conf,
                                  alpha=cfg.significance.alpha)
    summary = summarize(results, "accuracy", conf)
    write_table(picks, out, "nearest")
    write_table(results, out, "results")
    write_table(comparisons, out, "comparisons")
    write_table(summary.reset_index(), out, "summary")
    return comparisons


def nearest_choice(cfg: StudyConfig) -> tuple[str, str]:
    """(embedding, metric) nearest-task initialisation ranks sources by: Task2Vec normalized cosine when the
    config has them, else the first embedding and its first metric."""
    t = cfg.transfer
    name = "task2vec" if "task2vec" in t.embeddings else t.embeddings[0]
    return name, "normalized_cosine" if "normalized_cosine" in t.metrics[name] else t.metrics[name][0]


def nearest_title(cfg: StudyConfig) -> str:
    """The nearest-task table's header, naming the embedding and metric actually used."""
    name, metric = nearest_choice(cfg)
    return f"nearest-task initialisation ({EMBEDDING_NAMES[name]}, {metric.replace('_', ' ')} distance)"


def rho_text(rho: pd.DataFrame, confidence: float = 0.95) -> str:
    """A fixed-width table: one line per embedding x metric, rho over pairs and its CI (`*`: excludes 0), and
    the mean over targets of the within-target rho, and how many targets it is over when a target's rho is
    undefined (its distances or gains constant over the sources)."""
    level = f"{confidence:.0%}"
    lines = [f"{'embedding':<10} {'metric':<18} {'rho':>7}  {level + ' CI':<18} {'pairs':>5}  {'within-target':>13}"]
    for r in rho.itertuples():
        mark = "*" if r.ci_high < 0 or r.ci_low > 0 else " "
        lines.append(f"{r.embedding:<10} {r.metric:<18} {r.rho:>7.3f}  [{r.ci_low:>6.3f}, {r.ci_high:>6.3f}]{mark} "
                     f"{r.n_pairs:>5}  {r.rho_within_target:>13.3f}{_within_note(r)}")
    return "\n".join(lines)


def _within_note(r) -> str:
    defined, n = getattr(r, "n_targets_defined", None), getattr(r, "n_targets", None)
    if defined is None or defined == n:
        return ""
    return f"  mean over {defined} of {n} targets; {n - defined} undefined (constant ranks)"
