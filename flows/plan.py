"""Stage graph and cache keys, computed from the config alone (no Prefect, no MLflow).

A stage's key hashes exactly the values the stage is called with (the family's settings and the plain
settings `flows/families.py` builds), its upstream entries' keys, and its code: the source of the stage's
module and of the family's module with everything they import from the project (`flows.versions`).
The task sets' key also hashes the content of every input file the family reads. What a stage needs
that a key cannot know (an upstream entry rewritten under the same key, e.g. a meta-training continued
under a larger budget) is caught by the entries' recorded input digests (`flows.cache`).

Keys leave out what does not change a result: the wall-clock budget (a larger one continues from the
checkpoint), and for the checkpoint folder also the number of iterations.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from components.families import TaskFamily
from flows.cache import content_key
from flows.config import StudyConfig
from flows.families import AlgorithmSettings, algorithm_settings, family_for
from flows.versions import ROOT, code_version, input_digests, input_path

STAGES = ("task_sets", "embeddings", "meta_train", "evaluate", "baselines", "significance")
MODULES = {stage: f"flows.stages.{stage}" for stage in (*STAGES, "prefix")}  # the code each stage runs
MODULES["train_sets"] = MODULES["task_sets"]
# Text families also cache a "prefix" entry (the frozen lower encoder layers' hidden states per utterance),
# computed by the embeddings stage and read by meta_train, evaluate and baselines. The task_sets stage also
# writes "train_sets": its tables but the family's `test_tables`, keyed without the settings and files that only
# the meta-test episodes depend on; meta-training reads it, so a new test protocol keeps the meta-training.
DATA = ("task_sets", "prefix")
WRITTEN_BESIDE = {"prefix": "embeddings", "train_sets": "task_sets"}  # entry -> the stage that writes it when missing
UPSTREAM = {
    "task_sets": (),
    "embeddings": ("task_sets",),
    "meta_train": ("task_sets",),
    "evaluate": ("task_sets", "meta_train"),
    "baselines": ("task_sets",),
    "significance": ("evaluate", "baselines"),
}
PREFIX_READERS = ("meta_train", "evaluate", "baselines")  # they read a prefix the embeddings stage caches

Entry = tuple[str, str]  # (stage, key): one cache entry


@dataclass(frozen=True)
class Plan:
    family: TaskFamily
    keys: dict[str, str]  # stage -> cache key (meta_train: a hash of its units' keys)
    algorithm_keys: dict[str, str]  # unit label -> key of its meta_train entry
    checkpoint_keys: dict[str, str]  # unit label -> its checkpoint folder (the trajectory: no iterations, budget)
    units: dict[str, tuple[str, int]]  # unit label ("maml", or "maml/seed1" with seeds) -> (algorithm, seed)
    settings: dict[str, AlgorithmSettings]  # unit label -> what it trains with
    inputs: dict[str, str]  # input file -> sha256
    data: tuple[Entry, ...]  # the entries the family's tables come from
    train_data: tuple[Entry, ...]  # the entries meta-training reads its tables from (train_sets, maybe the prefix)
    settings_keys: dict[str, str]  # data stage -> its key without the input files' content

    def settings_key(self, stage: str) -> str:
        return self.settings_keys[stage]

    def part_key(self, label: str) -> str:
        """A unit's share of the evaluate entry (its own entry, so a crash mid-stage keeps finished units)."""
        return content_key({"evaluate": self.keys["evaluate"], "unit": label})

    def reads(self, stage: str, label: str | None = None) -> tuple[Entry, ...]:
        """The entries a stage's entry (a unit's, given label) is computed from."""
        if stage in DATA:
            return ()
        if stage == "meta_train" and label:
            return self.train_data
        if stage in ("embeddings", "baselines"):
            return self.data
        if stage == "meta_train":
            return tuple(("meta_train", k) for k in self.algorithm_keys.values())
        if stage == "evaluate_parts":
            return (*self.data, ("meta_train", self.algorithm_keys[label]))
        if stage == "evaluate":
            return tuple(("evaluate_parts", self.part_key(u)) for u in self.units)
        return (("evaluate", self.keys["evaluate"]), ("baselines", self.keys["baselines"]))


    @functools.cached_property
    def graph(self) -> dict[Entry, tuple[Entry, ...]]:
        """Every entry of the study and the entries it is computed from."""
        g: dict[Entry, tuple[Entry, ...]] = {entry: () for entry in (*self.data, *self.train_data)}
        for stage in ("embeddings", "baselines", "evaluate", "significance"):
            g[(stage, self.keys[stage])] = self.reads(stage)
        for label, key in self.algorithm_keys.items():
            g[("meta_train", key)] = self.reads("meta_train", label)
            g[("evaluate_parts", self.part_key(label))] = self.reads("evaluate_parts", label)
        return g

    def status(self, cache, stage: str, key: str) -> str:
        """"cached", "missing" or "stale" (its own inputs, or theirs, changed since it was computed)."""
        graph, memo = self.graph, {}

        def status(entry: Entry) -> str:
            if entry not in memo:
                own = cache.status(*entry, graph.get(entry, ()))
                memo[entry] = own if own != "cached" or all(status(r) == "cached" for r in graph.get(entry, ())) \
                    else "stale"
            return memo[entry]

        return status((stage, key))


def provenance(plan: Plan, stage: str) -> dict:
    """What a data entry records of its making: its settings' key and its input files' digests
    (`metapeft stages` names the files that changed since)."""
    return {"settings": plan.settings_key(stage), "inputs": plan.inputs}


def has_prefix(family) -> bool:
    """A family whose embeddings stage also caches a prefix its later stages read (text: the frozen layers)."""
    return hasattr(family, "build_prefix")


def input_content(inputs: dict[str, str]) -> list[tuple[str, str]]:
    """(path relative to the inputs' common folder, sha256), sorted: what the data keys hash. Relative, so a moved
    project keeps its keys; with the folders, so an image moved to another class folder changes them."""
    if not inputs:
        return []
    base = Path(os.path.commonpath([str(Path(p).parent) for p in inputs]))
    return sorted((Path(p).relative_to(base).as_posix(), sha) for p, sha in inputs.items())


def unit_label(algorithm: str, seed: int, cfg: StudyConfig) -> str:
    """The algorithm's name alone without `seeds`; "maml/seed1" with them."""
    return algorithm if cfg.seeds is None else f"{algorithm}/seed{seed}"


def plain(value) -> object:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def without_paths(settings: dict, fields: tuple[str, ...]) -> dict:
    """settings without the (dotted) fields that name input files or folders (`TaskFamily.path_fields`): keys hash
    those files' content, so a path written relative, absolute or from another folder gives the same keys."""
    out = dict(settings)
    for field in fields:
        head, _, rest = field.partition(".")
        if rest and isinstance(out.get(head), dict):
            out[head] = without_paths(out[head], (rest,))
        elif not rest:
            out.pop(head, None)
    return out


def make_plan(cfg: StudyConfig, memo: Path | None = None, code_root: Path = ROOT) -> Plan:
    """Every key of the study; memo: the digest memo of input files (default: none, every file is hashed);
    code_root: the folder holding components/ and flows/ whose source the keys hash."""
    family = family_for(cfg)
    inputs = input_digests(family.input_files(), memo)
    content = input_content(inputs)
    # the prefix reads only the dataset's own files (not split lists or pools): the folds of a dataset share it
    prefix_content = (input_content(input_digests(family.prefix_files(), memo)) if hasattr(family, "prefix_files")
                      else content)

    def key(stage: str, config: object, *upstream: str) -> str:
        code = code_version([MODULES[stage], type(family).__module__], code_root)
        return content_key({"stage": stage, "config": config, "upstream": [keys[u] for u in upstream], "code": code})

    keys: dict[str, str] = {}
    paths = family.path_fields
    settings = {"task_sets": {"data": without_paths(plain(family.data), paths), "seed": cfg.seed}}
    data: tuple[str, ...] = ("task_sets",)
    if has_prefix(family):  # the family says what its prefix depends on (not k_shot etc.)
        settings["prefix"] = without_paths(family.prefix_settings(), paths)
        data = ("task_sets", "prefix")
    for stage in data:
        keys[stage] = key(stage, {**settings[stage], "inputs": prefix_content if stage == "prefix" else content})
    training = {p: inputs[p] for p in map(input_path, family.training_files())}
    settings["train_sets"] = {"data": without_paths(family.training_data(), paths), "seed": cfg.seed}
    keys["train_sets"] = key("train_sets", {**settings["train_sets"], "inputs": input_content(training)})
    train_data = ("train_sets", *data[1:])
    settings_keys = {stage: key(stage, settings[stage]) for stage in (*data, "train_sets")}
    e = cfg.embedding
    keys["embeddings"] = key("embeddings", {"metrics": list(e.metrics), "n_similarity_tasks": e.n_similarity_tasks},
                             *data)
    units = {unit_label(a, s, cfg): (a, s) for a in cfg.meta_train.algorithms for s in cfg.train_seeds}
    trains = {label: algorithm_settings(cfg, a, s) for label, (a, s) in units.items()}

    def unit(label: str, trajectory: bool) -> str:
        s = trains[label]
        train = {k: v for k, v in plain(s.train).items()
                 if k != "budget_seconds" and not (trajectory and k in ("iterations", "checkpoint_every"))}
        config = {"learner": plain(s.learner), "train": train, "zero_head": s.zero_head,
                  "model": plain(family.model_settings)}
        return key("meta_train", config | ({"trajectory": True} if trajectory else {}), *train_data)

    algorithm_keys = {label: unit(label, False) for label in units}
    checkpoint_keys = {label: unit(label, True) for label in units}
    keys["meta_train"] = content_key(algorithm_keys)
    ev = cfg.evaluate.model_dump()
    keys["evaluate"] = key("evaluate", ev, *data, "meta_train")
    keys["baselines"] = key("baselines", {"baselines": plain(family.baselines), "model": plain(family.model_settings),
                                          "evaluate": ev, "seed": cfg.seed}, *data)
    keys["significance"] = key("significance", {"confidence": cfg.significance.confidence,
                                                "alpha": cfg.significance.alpha, "metric": family.metric,
                                                "lower_is_better": family.lower_is_better}, "evaluate", "baselines")
    return Plan(family, keys, algorithm_keys, checkpoint_keys, units, trains, inputs,
                tuple((s, keys[s]) for s in data), tuple((s, keys[s]) for s in train_data), settings_keys)


def upstream(stage: str, cfg: StudyConfig | None = None) -> tuple[str, ...]:
    """The stages whose output `stage` reads (text families: the embeddings stage's prefix, too)."""
    extra = ("embeddings",) if cfg is not None and stage in PREFIX_READERS and has_prefix(family_for(cfg)) else ()
    return UPSTREAM[stage] + extra


def needed_stages(only: set[str] | None, cfg: StudyConfig | None = None) -> list[str]:
    """The requested stages and everything upstream of them, in pipeline order (all when only is empty)."""
    if not only:
        return list(STAGES)
    unknown = sorted(only - set(STAGES))
    if unknown:
        raise ValueError(f"--stage: unknown stage(s) {unknown}; stages are {list(STAGES)}")
    needed, todo = set(), list(only)
    while todo:
        stage = todo.pop()
        if stage not in needed:
            needed.add(stage)
            todo.extend(upstream(stage, cfg))
    return [s for s in STAGES if s in needed]


def stage_range(first: str | None = None, last: str | None = None) -> list[str]:
    """The stages from `first` to `last` in pipeline order (`--from` / `--until`; an open end: the first or last)."""
    i, j = STAGES.index(first or STAGES[0]), STAGES.index(last or STAGES[-1])
    if i > j:
        raise ValueError(f"--from {first} comes after --until {last}; stages run in the order {', '.join(STAGES)}")
    return list(STAGES[i:j + 1])


def stage_entries(plan: Plan, stage: str) -> dict[str, Entry]:
    """The cache entries a stage writes, by the names `metapeft stages` prints: one per unit for meta_train
    ("meta_train[maml]"); the embeddings stage also writes a text family's prefix, the task_sets stage the
    training side of the task sets (train_sets)."""
    if stage == "meta_train":
        return {f"meta_train[{label}]": ("meta_train", key) for label, key in plan.algorithm_keys.items()}
    beside = {e: (e, plan.keys[e]) for e, owner in WRITTEN_BESIDE.items() if owner == stage and e in plan.keys}
    return {stage: (stage, plan.keys[stage])} | beside


def unready_upstream(plan: Plan, cache, only: set[str], cfg: StudyConfig) -> list[tuple[str, str, str, str]]:
    """What a run of only these stages reads from the cache and does not find there, in pipeline order:
    (the stage that computes it, entry name, key, "missing" or "stale"). Empty for a whole run."""
    if not only:
        return []
    return [(stage, name, key, status) for stage in needed_stages(only, cfg) if stage not in only
            for name, (written, key) in stage_entries(plan, stage).items()
            if (status := plan.status(cache, written, key)) != "cached"]


def unready_message(unready: list[tuple[str, str, str, str]], rerun: str) -> str:
    """One line naming every entry of `unready_upstream` and the command that computes them (rerun: `metapeft
    run` with the study's --config and --set)."""
    entries = ", ".join(f"'{name}' ({status}, key {key})" for _, name, key, status in unready)
    stages = " ".join(f"--stage {stage}" for stage in dict.fromkeys(stage for stage, *_ in unready))
    return f"not in the cache for this config: {entries}; compute {'it' if len(unready) == 1 else 'them'} " \
           f"first: {rerun} {stages}"
