"""Study configuration: YAML validated at the boundary with pydantic.

A wrong key, type or value stops the run before any work, with an error naming the key and the file.
Components never see these models: `components_config` style helpers turn sections into the
components' frozen dataclasses.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
import typing
from typing import Annotated, Literal, Union, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from components.metalearners import ALGORITHMS, MAML_PP, VARIANTS, MetaLearnerConfig

Algorithm = Literal[tuple(VARIANTS)]  # every algorithm of components.metalearners.VARIANTS, by name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data):
        """pydantic's lax mode reads true as 1 for a number: `--set family.k_shot=true` would run 1-shot."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if field is not None and _has_bool(value) and not _allows_bool(field.annotation):
                    raise ValueError(f"{name}: a boolean ({yaml.safe_dump(value).split(chr(10))[0]}) where a "
                                     f"number or text is needed")
        return data


class SinusoidSection(Section):
    kind: Literal["sinusoid"] = "sinusoid"
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    k_shot: int = Field(10, ge=1)
    n_query: int = Field(10, ge=1)
    n_tasks: dict[Literal["meta_train", "meta_val", "meta_test"], int] = Field(
        default_factory=lambda: {"meta_train": 5000, "meta_val": 100, "meta_test": 600})

    @model_validator(mode="after")
    def _check(self):
        for name in ("amplitude", "phase", "x_range"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise ValueError(f"{name}: need low < high, got [{lo}, {hi}]")
        for split in ("meta_train", "meta_val", "meta_test"):
            if self.n_tasks.get(split, 0) < 1:
                raise ValueError(f"n_tasks.{split}: need at least 1 task")
        return self


class EpisodeSection(Section):
    """A classification family's N-way K-shot episodes and how many fixed meta-val / meta-test ones."""

    n_way: int = Field(5, ge=2)
    k_shot: int = Field(1, ge=1)
    n_query: int = Field(15, ge=1)  # queries per class
    n_val_episodes: int = Field(100, ge=1)
    n_test_episodes: int = Field(600, ge=1)
    # an example (normalised text, identical pixels) under two labels: a named error, or every copy dropped;
    # repeats within one label are always dropped, with a count in the validation report
    conflicting_labels: Literal["error", "drop"] = "error"


def check_fractions(fractions: tuple[float, ...], name: str = "fractions") -> None:
    if abs(sum(fractions) - 1) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"{name}: need three positive shares summing to 1, got {list(fractions)}")


def check_test_episodes(section: EpisodeSection) -> None:
    """An image family's fixed episode file (`test_episodes`, relative to the current directory like `path`): a
    .csv or .parquet table whose episodes replace the sampled meta-test ones, so n_test_episodes is not read.
    Its content (and a missing file) is checked when the plan reads it, as `path` is."""
    from components.episode_files import READERS

    if section.test_episodes is None:
        return
    if Path(section.test_episodes).suffix.lower() not in READERS:
        raise ValueError(f"test_episodes: a fixed episode file is {' or '.join(READERS)}, got "
                         f"{section.test_episodes!r}")
    default = type(section).model_fields["n_test_episodes"].default
    if "n_test_episodes" in section.model_fields_set and section.n_test_episodes != default:
        raise ValueError(f"n_test_episodes: read only without test_episodes (the file's episodes are the meta-test "
                         f"episodes); leave it out or at its default {default}")


class OmniglotSection(EpisodeSection):
    kind: Literal["omniglot"]
    path: str = "../shared/data/omniglot"  # images_background.zip, images_evaluation.zip, splits_vinyals/
    split: Literal["vinyals", "random"] = "vinyals"  # random: seeded 1028/172/423-style fractions below
    random_fractions: tuple[float, float, float] = (0.64, 0.10, 0.26)
    image_size: int = Field(28, ge=8)
    # a fixed episode file (CSV / Parquet: episode, role, image, label): the meta-test episodes (README)
    test_episodes: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.k_shot + self.n_query > 20:
            raise ValueError(f"k_shot + n_query: Omniglot has 20 drawings per class, got {self.k_shot + self.n_query}")
        check_fractions(self.random_fractions, "random_fractions")
        check_test_episodes(self)
        return self


class ImageFolderSection(EpisodeSection):
    """A user's own images, <path>/<class>/<image>, any size and format Pillow reads; classes disjoint across
    splits. Whether every split has n_way classes of k_shot + n_query images is known only from the folder."""

    kind: Literal["image_folder"]
    path: str  # the root; split: files reads classes.train.txt, classes.val.txt, classes.test.txt from it too
    channels: Literal[1, 3] = 1  # 1: grayscale, 3: RGB
    image_size: int = Field(28, ge=8)  # every image is resized (stretched) to this square once
    split: Literal["random", "files"] = "random"  # random: seeded, by fractions; files: the class lists
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # meta_train, meta_val, meta_test share of classes
    # a fixed episode file (CSV / Parquet: episode, role, image, label): the meta-test episodes (README)
    test_episodes: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if not self.path:
            raise ValueError("path: the image folder's root, <path>/<class>/<image>")
        check_fractions(self.fractions)
        check_test_episodes(self)
        default = type(self).model_fields["fractions"].default
        if self.split == "files" and "fractions" in self.model_fields_set and self.fractions != default:
            raise ValueError("fractions: read only with split: random; split: files takes the class lists")
        return self


class TextSection(EpisodeSection):
    """Few-shot intent classification: N-way K-shot episodes of utterances, classes disjoint across splits."""

    kind: Literal["text"]
    dataset: Literal["clinc150", "banking77", "csv"] = "clinc150"
    # clinc150: data_full.json (+ domains.json); banking77: train.csv, test.csv (default: ../shared/data/<dataset>);
    # csv: a .csv, .jsonl or .json file, required
    path: str | None = None
    text_col: str = "text"  # csv / jsonl only
    label_col: str = "label"
    domain_col: str | None = None
    split_by: Literal["class", "domain"] = "class"  # domain: whole domains per split (CLINC150 has 10)
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # meta_train, meta_val, meta_test share of classes
    max_length: int = Field(32, ge=4)  # tokens per utterance (longer ones are truncated)
    # split: files reads the intents of each meta-split from labels.train.txt, labels.valid.txt, labels.test.txt
    # in split_dir (every intent of the data listed once), or, in a study over folds (top-level `folds`), in
    # <split_root>/<fold> for each fold; paths relative to the current directory, like `path`
    split: Literal["random", "files"] = "random"
    split_dir: str | None = None
    split_root: str | None = None
    # split: files: meta-training draws from every utterance of the training intents ("full"), or only from the
    # labelled pool train.<train_pool>.jsonl in the fold's folder (columns text_col, label_col), e.g. "10samples"
    train_pool: str = Field("full", pattern=r"^[A-Za-z0-9_.-]+$")

    @model_validator(mode="before")
    @classmethod
    def _default_path(cls, data):
        """The shipped datasets default to ../shared/data/<dataset>; a user's csv has no default."""
        if isinstance(data, dict) and data.get("path") is None:
            dataset = data.get("dataset", "clinc150")
            if dataset == "csv":
                raise ValueError("path: dataset 'csv' needs the file (.csv, .jsonl or .json) of your utterances")
            data = {**data, "path": f"../shared/data/{dataset}"}
        return data

    @model_validator(mode="after")
    def _check(self):
        check_fractions(self.fractions)
        if self.split_by == "domain" and self.dataset == "banking77":
            raise ValueError("split_by: BANKING77 has no domains; use 'class'")
        if self.split_by == "domain" and self.dataset == "csv" and not self.domain_col:
            raise ValueError("split_by: 'domain' needs domain_col, the column naming each utterance's domain")
        fields = type(self).model_fields
        written = {n for n in self.model_fields_set if getattr(self, n) != fields[n].default}
        pool = self.split == "files" and self.train_pool != "full"  # a pool file is read with text_col / label_col
        for name in ("text_col", "label_col", "domain_col"):
            if self.dataset != "csv" and name in written and (name == "domain_col" or not pool):
                raise ValueError(f"{name}: read only with dataset: csv (text_col / label_col also name a train_pool "
                                 f"file's columns); {self.dataset} has a fixed layout")
        only = {"random": ("split_by", "fractions"), "files": ("split_dir", "split_root", "train_pool")}
        for split, names in only.items():
            if self.split != split and (wrong := [n for n in names if n in written]):
                raise ValueError(f"{wrong[0]}: read only with split: {split}; split is {self.split!r}")
        return self


def _has_bool(value) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(map(_has_bool, value)))


def _allows_bool(annotation) -> bool:
    """Whether a field's type takes a boolean anywhere (bool, bool | None, a section, ...)."""
    if annotation is bool or isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_allows_bool(a) for a in get_args(annotation)) or annotation is typing.Any


def _family_kind(value) -> str | None:
    """The family section's kind (None for a value that is no section: pydantic's union_tag_not_found)."""
    return value.get("kind", "sinusoid") if isinstance(value, dict) else getattr(value, "kind", None)


Family = Annotated[Union[Annotated[SinusoidSection, Tag("sinusoid")], Annotated[OmniglotSection, Tag("omniglot")],
                         Annotated[ImageFolderSection, Tag("image_folder")], Annotated[TextSection, Tag("text")]],
                   Discriminator(_family_kind)]
FAMILY_MODELS = {"sinusoid": "mlp", "omniglot": "conv4", "image_folder": "conv4", "text": "minilm"}  # kind -> model


class EmbeddingSection(Section):
    kind: Literal["features"] = "features"
    metrics: tuple[Literal["cosine", "euclidean", "manhattan"], ...] = ("cosine", "euclidean", "manhattan")
    n_similarity_tasks: int = Field(50, ge=2)  # meta-test tasks drawn in the similarity heatmaps


class ModelSection(Section):
    kind: Literal["mlp", "conv4", "minilm"] = "mlp"
    sizes: tuple[int, ...] = (1, 40, 40, 1)  # mlp layer widths
    hidden: int = Field(64, ge=1)  # conv4 filters per block
    adapted: Literal["full", "head", "lora"] = "full"  # the parameters the inner loop adapts
    lora_r: int = Field(4, ge=1)
    lora_alpha: float = Field(8.0, gt=0)
    top_layers: int = Field(2, ge=1, le=6)  # minilm: top layers run per episode (LoRA there); below is cached
    target_modules: tuple[str, ...] = ("query", "value")  # minilm: peft target modules in each top layer
    lora_b_std: float = Field(1e-3, ge=0)  # minilm: lora_B ~ N(0, std), not peft's zeros (dL/dA would start at 0)

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "mlp" and self.adapted != "full":
            raise ValueError(f"adapted: the mlp model adapts all its weights; only 'full', got {self.adapted!r}")
        for name in self._written():
            if self.kind not in MODEL_FIELDS.get(name, (self.kind,)):
                raise ValueError(f"{name}: read only by model.kind {' or '.join(MODEL_FIELDS[name])}; "
                                 f"this is {self.kind!r}")
            if name in LORA_FIELDS and self.adapted != "lora":
                raise ValueError(f"{name}: a LoRA setting, read only with adapted: lora; adapted is {self.adapted!r}")
        if self.kind == "mlp" and (len(self.sizes) < 2 or self.sizes[0] != 1 or self.sizes[-1] != 1
                                   or min(self.sizes) < 1):
            raise ValueError(f"sizes: the mlp maps a sinusoid's x to its y (one value each): need [1, ..., 1] with "
                             f"positive widths, got {list(self.sizes)}")
        if self.kind == "minilm" and self.adapted == "lora":
            _check_target_modules(self.target_modules)
        return self

    def _written(self) -> list[str]:
        """Fields the input set to a value other than the default; a dumped config (defaults and all) re-validates."""
        fields = type(self).model_fields
        return [n for n in fields if n in self.model_fields_set and getattr(self, n) != fields[n].default]


MODEL_FIELDS = {"sizes": ("mlp",), "hidden": ("conv4",), "lora_r": ("conv4", "minilm"),
                "lora_alpha": ("conv4", "minilm"), "top_layers": ("minilm",), "target_modules": ("minilm",),
                "lora_b_std": ("minilm",)}  # the model kinds that read each field; unlisted: every kind
LORA_FIELDS = ("lora_r", "lora_alpha", "target_modules", "lora_b_std")


def _check_target_modules(targets: tuple[str, ...]) -> None:
    """peft wraps the modules whose name is a target or ends with '.' + target; only linear ones are supported."""
    from components.text import layer_module_names

    if not targets:
        raise ValueError("target_modules: LoRA needs at least one module name, e.g. [query, value]")
    try:
        names = layer_module_names()
    except ImportError as e:
        raise ValueError(f"target_modules: cannot be checked against MiniLM's layers: {e}") from None
    if wrong := [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]:
        raise ValueError(f"target_modules: no module {', '.join(map(repr, wrong))} in MiniLM's layers; names there: "
                         f"{', '.join(names)} (or their endings, e.g. 'query')")


class AlgorithmOverride(Section):
    inner_steps: int | None = Field(None, ge=1)
    fast_lr: float | None = Field(None, gt=0)
    meta_lr: float | None = Field(None, gt=0)
    zero_head: bool | None = None
    lslr: bool | None = None
    msl_iterations: int | None = Field(None, ge=0)
    per_step_bn: bool | None = None
    first_order_iterations: int | None = Field(None, ge=0)
    meta_lr_schedule: Literal["constant", "cosine"] | None = None
    min_meta_lr: float | None = Field(None, ge=0)


class MetaTrainSection(Section):
    algorithms: tuple[Algorithm, ...] = ALGORITHMS  # default: the four that run on any model (no head needed)
    inner_steps: int = Field(1, ge=1)
    fast_lr: float = Field(0.01, gt=0)
    meta_lr: float = Field(1e-3, gt=0)
    meta_batch_size: int = Field(25, ge=1)
    iterations: int = Field(5000, ge=1)
    val_every: int = Field(100, ge=1)
    patience: int = Field(0, ge=0)  # validations without improvement before stopping; 0 = off
    checkpoint_every: int = Field(500, ge=1)
    budget_minutes: float | None = Field(None, gt=0)
    metasgd_lr_range: tuple[float, float] = (1e-4, 0.1)
    vectorize: bool = True
    # conv4 only: run a chunk of tasks as one network with task-grouped convolutions (1.5x learn2learn on
    # CPU, benchmarks/omniglot.py); task_chunk tasks per graph, query_chunk tasks per query graph (memory)
    task_batched: bool = False
    task_chunk: int = Field(0, ge=0)
    query_chunk: int = Field(0, ge=0)
    # classification: the head starts every task at zero and is not meta-learned (the "zeroing trick",
    # Kao et al. 2022); per-episode label order makes a learned head start noise for FOMAML and Reptile
    zero_head: bool = False
    # MAML++ (Antoniou et al., ICLR 2019), each on its own so its effect can be measured; read by the algorithms
    # with a differentiated inner loop (not reptile, not protonet: set them under overrides when those run too)
    lslr: bool = False  # learned per-layer, per-step inner rates, starting at fast_lr
    msl_iterations: int = Field(0, ge=0)  # multi-step loss, annealed to the last step over N iterations; 0 = off
    per_step_bn: bool = False  # conv4: batch-norm weights and biases per inner step, not adapted
    first_order_iterations: int = Field(0, ge=0)  # first order for the first N iterations, then second order
    meta_lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: meta_lr to min_meta_lr over `iterations`
    min_meta_lr: float = Field(0.0, ge=0)  # the cosine's floor (MAML++ used 1e-5)
    overrides: dict[Algorithm, AlgorithmOverride] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.algorithms)) != len(self.algorithms) or not self.algorithms:
            raise ValueError(f"algorithms: need a non-empty list without repeats, got {list(self.algorithms)}")
        lo, hi = self.metasgd_lr_range
        if not 0 < lo <= hi:
            raise ValueError(f"metasgd_lr_range: need 0 < low <= high, got [{lo}, {hi}]")
        if self.query_chunk and not self.task_batched:
            raise ValueError("query_chunk: only task_batched learners split the query apart from the support; "
                             "set task_batched: true or drop query_chunk")
        return self

    @model_validator(mode="after")
    def _check_options(self):
        """Each algorithm's MAML++ options (overrides applied), by the learners' own rules (MetaLearnerConfig)."""
        for algorithm in self.algorithms:
            s = self.for_algorithm(algorithm)
            try:
                MetaLearnerConfig(algorithm=algorithm, inner_steps=s["inner_steps"], **{k: s[k] for k in MAML_PP})
            except ValueError as e:
                name, _, why = str(e).partition(": ")
                raise ValueError(f"{self.field(algorithm, name)}: {why} (algorithm {algorithm})") from None
            if s["meta_lr_schedule"] != "cosine" and s["min_meta_lr"]:
                raise ValueError(f"{self.field(algorithm, 'min_meta_lr')}: read only with meta_lr_schedule: cosine "
                                 f"(algorithm {algorithm})")
            if s["min_meta_lr"] > s["meta_lr"]:
                raise ValueError(f"{self.field(algorithm, 'min_meta_lr')}: {s['min_meta_lr']} exceeds meta_lr "
                                 f"{s['meta_lr']} (algorithm {algorithm})")
            if s["first_order_iterations"] and s["first_order_iterations"] >= s["iterations"]:  # all first order
                raise ValueError(f"{self.field(algorithm, 'first_order_iterations')}: {s['first_order_iterations']} "
                                 f"of {s['iterations']} iterations leaves none second order: that is fomaml, not "
                                 f"{algorithm} (algorithm {algorithm})")
        return self

    def field(self, algorithm: str, name: str) -> str:
        """Where the algorithm's value of a field comes from: `overrides.<algorithm>.<name>` or `<name>`."""
        override = self.overrides.get(algorithm)
        return name if override is None or getattr(override, name, None) is None else f"overrides.{algorithm}.{name}"

    def for_algorithm(self, algorithm: str) -> dict:
        """This section with the algorithm's overrides applied (what its cache key hashes)."""
        base = self.model_dump(exclude={"algorithms", "overrides"})
        override = self.overrides.get(algorithm)
        if override is not None:
            base.update({k: v for k, v in override.model_dump().items() if v is not None})
        if not base["zero_head"]:
            del base["zero_head"]  # off: the keys of entries cached before the option existed stay valid
        return {"algorithm": algorithm, **base}


class EvaluateSection(Section):
    steps: int = Field(10, ge=1)  # test-time inner steps
    score_every: int = Field(1, ge=1)  # score the query set at steps 0, k, 2k, ... and the last (cost: queries)
    chunk: int = Field(200, ge=1)  # tasks adapted at once (bounds memory)


class BaselinesSection(Section):
    scratch_lr: float = Field(0.01, gt=0)
    finetune_lr: float = Field(0.01, gt=0)
    pretrain_iterations: int = Field(2000, ge=1)
    pretrain_lr: float = Field(1e-3, gt=0)
    pretrain_batch_size: int = Field(25, ge=1)
    head_lr: float = Field(0.5, gt=0)  # text: linear head on the frozen sentence embedding, from zeros


class SignificanceSection(Section):
    confidence: float = Field(0.95, gt=0, lt=1)
    alpha: float = Field(0.01, gt=0, lt=1)  # significance level for the summary verdicts


class RuntimeSection(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    data_dir: str = "data"  # stage cache, relative to the project root
    experiment: str = "metapeft"
    runner: Literal["sequential", "dask"] = "sequential"  # dask: meta-training and evaluation per algorithm x seed
    dask_address: str | None = None  # an existing Dask scheduler (tcp://host:8786); None: a LocalCluster
    dask_workers: int = Field(2, ge=1)  # LocalCluster worker processes, one thread each

    @model_validator(mode="after")
    def _check(self):
        if self.dask_address and self.runner != "dask":
            raise ValueError("dask_address: set runner: dask to use a Dask cluster")
        return self


EMBEDDINGS = ("task2vec", "encoder", "features")
Distance = Literal["normalized_cosine", "cosine", "euclidean", "manhattan"]
DEFAULT_METRICS = {"task2vec": ("normalized_cosine", "cosine", "euclidean", "manhattan"),
                   "encoder": ("cosine", "euclidean", "manhattan"), "features": ("cosine", "euclidean", "manhattan")}


class TransferSection(Section):
    """Does task-embedding distance predict transfer? One meta-training per group of classes (an Omniglot
    alphabet, a CLINC150 domain), scored on every group's held-out classes; rank correlation with distance."""

    groups: tuple[str, ...] = ()  # alphabets (images_background) / domains by name; empty: the first n_groups
    n_groups: int = Field(8, ge=3)  # used when groups is empty
    test_fraction: float = Field(0.4, gt=0, lt=1)  # each group's classes kept for its test episodes, never trained on
    algorithm: Literal["maml", "fomaml", "reptile", "metasgd"] = "maml"  # meta_train's rates and batching apply
    iterations: int = Field(100, ge=1)  # meta-training per source group
    budget_minutes: float | None = Field(None, gt=0)  # per meta-training (each source, pooled): first to end wins
    pooled_iterations: int = Field(200, ge=1)  # the meta-learned start over every group (also the image probe)
    val_episodes: int = Field(10, ge=1)  # per group, from its training classes
    test_episodes: int = Field(30, ge=2)  # fixed per target group: every source and method scores these
    embed_episodes: int = Field(10, ge=2)  # labelled sets per group for the embeddings (n_way classes each)
    embed_shots: int = Field(5, ge=1)  # examples per class in them: a group's embedding describes its dataset
    embeddings: tuple[Literal["task2vec", "encoder", "features"], ...] = EMBEDDINGS
    # per embedding; one left out keeps its default (normalized_cosine needs non-negative vectors: Task2Vec only)
    metrics: dict[Literal["task2vec", "encoder", "features"], tuple[Distance, ...]] = Field(
        default_factory=lambda: dict(DEFAULT_METRICS))
    task2vec_labels: Literal["sampled", "expected", "empirical"] = "sampled"
    task2vec_samples: int = Field(4, ge=1)  # labels drawn per example (sampled)
    task2vec_chunk: int | None = Field(None, ge=1)  # examples per vmap call (text: bounds memory)
    encoder_steps: int = Field(300, ge=1)  # TaskEmbeddingNetwork, InfoNCE over the groups' embedding episodes
    encoder_hidden: int = Field(64, ge=1)
    encoder_dim: int = Field(16, ge=1)
    n_boot: int = Field(2000, ge=100)
    resample: Literal["targets", "pairs"] = "targets"
    confidence: float = Field(0.95, gt=0, lt=1)

    @field_validator("metrics", mode="before")
    @classmethod
    def _default_metrics(cls, value):
        return {**DEFAULT_METRICS, **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.groups)) != len(self.groups) or 0 < len(self.groups) < 3:
            raise ValueError(f"groups: need at least 3 distinct names (or none), got {list(self.groups)}")
        if not self.embeddings or len(set(self.embeddings)) != len(self.embeddings):
            raise ValueError(f"embeddings: need a non-empty list without repeats, got {list(self.embeddings)}")
        for name in self.embeddings:
            if not self.metrics.get(name):
                raise ValueError(f"metrics.{name}: no distance metric for this embedding")
            if name != "task2vec" and "normalized_cosine" in self.metrics[name]:
                raise ValueError(f"metrics.{name}: normalized_cosine needs non-negative vectors (Task2Vec only)")
        return self


class StudyConfig(Section):
    name: str = "study"
    seed: int = Field(0, ge=0)  # task sets, baselines and evaluation episodes (numpy seeds are non-negative)
    seeds: tuple[int, ...] | None = None  # meta-training seeds (init, meta-batches); None: just `seed`
    family: Family = Field(default_factory=SinusoidSection)
    embedding: EmbeddingSection = Field(default_factory=EmbeddingSection)
    model: ModelSection = Field(default_factory=ModelSection)
    meta_train: MetaTrainSection = Field(default_factory=MetaTrainSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    baselines: BaselinesSection = Field(default_factory=BaselinesSection)
    significance: SignificanceSection = Field(default_factory=SignificanceSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    transfer: TransferSection | None = None  # present: `metapeft run` runs the transfer study (flows/transfer.py)
    # a study over class splits (text, split: files): each fold a folder under family.split_root (or, without
    # split_root, a folder path); every fold runs as its own cached pipeline and flows.folds.fold_study reports
    # each fold and the mean over folds. Quote the names: YAML reads 01 as the number 1
    folds: tuple[str, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _fold_names(cls, data):
        folds = data.get("folds") if isinstance(data, dict) else None
        if isinstance(folds, (list, tuple)) and (numbers := [v for v in folds if not isinstance(v, str)]):
            raise ValueError(f"folds: give folder names as strings, e.g. ['01', '02'] (YAML reads 01 as the number 1); "
                             f"got {numbers[:3]}")
        return data

    @model_validator(mode="after")
    def _model_fits_family(self):
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds: need a non-empty list without repeats, got {list(self.seeds)}")
        if self.seeds is not None and (negative := [s for s in self.seeds if s < 0]):
            raise ValueError(f"seeds: need non-negative integers, got {negative}")
        expected = FAMILY_MODELS[self.family.kind]
        if self.model.kind != expected:
            raise ValueError(f"model.kind: the {self.family.kind} family needs {expected!r}, got {self.model.kind!r}")
        if self.model.kind == "minilm" and self.model.adapted == "full":
            raise ValueError("model.adapted: the MiniLM backbone stays frozen; choose 'lora' or 'head'")
        if self.transfer is not None and self.family.kind not in ("omniglot", "text"):
            raise ValueError(f"transfer: needs groups of classes (Omniglot alphabets, text domains), i.e. the "
                             f"omniglot or text family; this is {self.family.kind!r}")
        if self.transfer is not None and self.seeds is not None:  # would be ignored: one shared initialisation
            raise ValueError(f"seeds: a transfer study uses `seed` (one shared initialisation for every source); "
                             f"remove seeds {list(self.seeds)}")
        zero_head = [f"meta_train.{self.meta_train.field(a, 'zero_head')}" for a in self.meta_train.algorithms
                     if self.meta_train.for_algorithm(a).get("zero_head")]
        if zero_head and self.family.kind == "sinusoid":
            raise ValueError(f"{zero_head[0]}: the sinusoid family is regression; it has no classification head")
        if self.meta_train.task_batched and self.model.kind != "conv4":
            raise ValueError(f"meta_train.task_batched: only the conv4 model runs a chunk of tasks as one network; "
                             f"model.kind is {self.model.kind!r}")
        if self.family.kind == "sinusoid" and self.meta_train.meta_batch_size > self.family.n_tasks["meta_train"]:
            raise ValueError(f"meta_train.meta_batch_size: {self.meta_train.meta_batch_size} exceeds the "
                             f"{self.family.n_tasks['meta_train']} tasks of family.n_tasks.meta_train")
        self._check_rates()
        if self.transfer is not None:
            self._check_transfer_groups()
        self._check_split_files()
        return self

    @property
    def fold(self) -> str | None:
        """The fold this config runs when it is one fold of a fold study (its name in `folds`, as the study tags its
        run), else None."""
        split_dir = getattr(self.family, "split_dir", None)
        if not self.folds or not split_dir:
            return None
        here = Path(split_dir).resolve()
        return next((f for f, folder in fold_dirs(self).items() if Path(folder).resolve() == here),
                    Path(split_dir).name)

    @property
    def label(self) -> str:
        """The study's name as results show it: '<name> fold <NN>' for one fold of a fold study."""
        return f"{self.name} fold {self.fold}" if self.fold else self.name

    def unused_overrides(self) -> list[str]:
        """`meta_train.overrides.<algorithm>` entries this study does not read: their algorithm is not among
        meta_train.algorithms (a transfer study: not transfer.algorithm). Kept valid, not an error, so that
        `--set meta_train.algorithms=[...]` can narrow a config; said (flows.cli) so a misplaced one is seen."""
        used = {self.transfer.algorithm} if self.transfer is not None else set(self.meta_train.algorithms)
        runs = f"transfer.algorithm is {self.transfer.algorithm}" if self.transfer is not None \
            else f"meta_train.algorithms is [{', '.join(self.meta_train.algorithms)}]"
        return [f"meta_train.overrides.{a}: not used, {runs}" for a in self.meta_train.overrides if a not in used]

    def _check_split_files(self) -> None:
        """split: files needs one fold's folder (split_dir), or folds under split_root; with folds, a split_dir
        names one of them (what flows.folds gives each fold's pipeline)."""
        f = self.family
        files = f.kind == "text" and f.split == "files"
        if self.folds is not None:
            if not files:
                raise ValueError("folds: a study over class splits needs family.kind: text with split: files")
            if not self.folds or len(set(self.folds)) != len(self.folds):
                raise ValueError(f"folds: need a non-empty list without repeats, got {list(self.folds)}")
            if self.transfer is not None:
                raise ValueError("folds: a transfer study runs whole, over its own groups; drop folds or transfer")
            dirs = fold_dirs(self)
            if len({Path(d).name for d in dirs.values()}) != len(dirs):
                raise ValueError(f"folds: every fold's folder needs its own name, got {list(dirs.values())}")
            if f.split_dir is not None and Path(f.split_dir).resolve() not in {Path(d).resolve() for d in dirs.values()}:
                raise ValueError(f"family.split_dir: with folds, it names one fold's folder "
                                 f"({', '.join(dirs.values())}), got {f.split_dir!r}; leave it out to run every fold")
        elif files and f.split_root is not None:
            raise ValueError("family.split_root: read only with folds (the fold folders under it)")
        elif files and f.split_dir is None:
            raise ValueError("family.split_dir: split: files needs the folder of labels.train.txt, labels.valid.txt "
                             "and labels.test.txt (or folds, with family.split_root)")
        if files and self.transfer is not None:
            raise ValueError("transfer: groups are domains of intents; the transfer study does not read split files")

    @model_validator(mode="after")
    def _algorithms_fit_model(self):
        """ANIL and the prototype algorithms need a classification head (never zeroed when built from prototypes);
        per-step batch norm needs conv4's batch norm."""
        mt = self.meta_train
        for algorithm in mt.algorithms:
            s, variant = mt.for_algorithm(algorithm), VARIANTS[algorithm]
            if variant.needs_head and self.family.kind == "sinusoid":
                raise ValueError(f"meta_train.algorithms: {algorithm} needs a classification head; the sinusoid "
                                 "family is regression")
            if variant.head_init == "prototypes" and s.get("zero_head"):
                raise ValueError(f"meta_train.{mt.field(algorithm, 'zero_head')}: {algorithm} starts the head from "
                                 f"the support prototypes on every task; set overrides.{algorithm}.zero_head: false")
            if variant.head_init == "prototypes" and self.model.kind == "minilm" and self.model.adapted == "head":
                raise ValueError(f"model.adapted: {algorithm} builds the head from prototypes, and with adapted: head "
                                 "the frozen MiniLM top has nothing else to meta-learn; use adapted: lora")
            if s["per_step_bn"] and self.model.kind != "conv4":
                raise ValueError(f"meta_train.{mt.field(algorithm, 'per_step_bn')}: only the conv4 model has batch "
                                 f"norm; model.kind is {self.model.kind!r}")
        return self

    def _check_rates(self) -> None:
        """Each learner's fast_lr against metasgd_lr_range, by the learners' own rule (MetaLearnerConfig: Meta-SGD
        starts its learned rates at fast_lr and clips them to the range); the range itself is checked by its section."""
        mt = self.meta_train
        for algorithm in dict.fromkeys(mt.algorithms + ((self.transfer.algorithm,) if self.transfer else ())):
            rate = mt.for_algorithm(algorithm)["fast_lr"]
            try:
                MetaLearnerConfig(algorithm=algorithm, fast_lr=rate, lr_range=mt.metasgd_lr_range)
            except ValueError:
                override = mt.overrides.get(algorithm)
                field = "fast_lr" if override is None or override.fast_lr is None else f"overrides.{algorithm}.fast_lr"
                raise ValueError(f"meta_train.{field}: {rate} is outside meta_train.metasgd_lr_range "
                                 f"{list(mt.metasgd_lr_range)}, where {algorithm} starts its inner rates (Meta-SGD "
                                 "then learns them, clipped to the range)") from None

    def _check_transfer_groups(self) -> None:
        f = self.family
        if getattr(f, "test_episodes", None) is not None:
            raise ValueError("family.test_episodes: the transfer study scores every group's own held-out classes; "
                             "it does not read a fixed episode file")
        if f.kind == "text" and f.dataset == "banking77":
            raise ValueError("transfer: groups are domains of intents, and BANKING77 has none; use clinc150 or a "
                             "csv with family.domain_col")
        if f.kind == "text" and f.dataset == "csv" and not f.domain_col:
            raise ValueError("transfer: groups are domains of intents; set family.domain_col")

    @property
    def train_seeds(self) -> tuple[int, ...]:
        return self.seeds or (self.seed,)


def fold_dirs(cfg: StudyConfig) -> dict[str, str]:
    """fold -> its folder: <family.split_root>/<fold>, or the fold itself without split_root (cfg.folds set)."""
    root = cfg.family.split_root
    return {fold: str(Path(root) / fold) if root is not None else fold for fold in cfg.folds}


def fold_overrides(cfg: StudyConfig, overrides: dict | None = None) -> dict[str, dict]:
    """fold -> the `load_config` overrides that make the study's config that fold's own pipeline: the caller's
    overrides with family.split_dir set to the fold's folder (cfg.folds set)."""
    overrides = overrides or {}
    return {fold: {**overrides, "family": {**overrides.get("family", {}), "split_dir": folder}}
            for fold, folder in fold_dirs(cfg).items()}


def check_fold_dirs(cfg: StudyConfig) -> None:
    """FileNotFoundError naming every fold whose folder is not there (said as such, not as its first list file)."""
    if missing := [f"{fold} ({folder})" for fold, folder in fold_dirs(cfg).items() if not Path(folder).is_dir()]:
        raise FileNotFoundError(f"folds: no folder for fold(s) {', '.join(missing)}")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def merge(base: dict, overrides: dict) -> dict:
    """base with overrides merged in: mappings recursively, other values replaced."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) and isinstance(out.get(key) or {}, dict) \
            else value
    return out


def load_config(path: str | Path, overrides: dict | None = None) -> StudyConfig:
    """The validated config of a YAML file; overrides are merged in first, nested mappings key by key
    ({section: {key: value}}, {"family": {"n_tasks": {"meta_train": 100}}}), anything else replacing the
    value ({"seed": 3})."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw = merge(raw, overrides or {})
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {'; '.join(map(_problem, e.errors()))}") from None


def _problem(err) -> str:
    """One pydantic error as `key: message`; our validators' messages start with the key, relative to err's loc."""
    loc = [str(part) for part in err["loc"]]
    kind = loc[1] if loc[:1] == ["family"] and len(loc) > 1 else None
    if kind is not None:
        del loc[1]  # the family's kind tag
    if err["type"] == "value_error":
        return ".".join([*loc, err["msg"].removeprefix("Value error, ")])
    where, given = ".".join(loc) or "<top>", err.get("input")
    if err["type"] == "union_tag_not_found":  # the family section is not a mapping
        return f"{where}: a section (a mapping such as {{kind: omniglot, ...}}) is needed, got {given!r}"
    if err["type"] == "union_tag_invalid":
        kinds = FAMILY_MODELS.keys()
        near = difflib.get_close_matches(str(err["ctx"]["tag"]), kinds, n=1)
        return (f"{where}.kind: {err['ctx']['tag']!r} is not a family kind; one of {', '.join(kinds)}"
                + (f" (did you mean {near[0]}?)" if near else ""))
    if err["type"] in ("model_type", "dict_type"):
        return f"{where}: a section (a mapping of keys) is needed, got {given!r}"
    if err["type"] in ("tuple_type", "list_type"):
        return f"{where}: a list such as [a, b] is needed, got {given!r}"
    if err["type"].endswith("_parsing") and isinstance(given, str):
        return f"{where}: {err['msg']}, got {given!r}" + (" (write numbers in YAML as 1000 or 1.0e+3)"
                                                          if "e" in given.lower() else "")
    if err["type"] == "extra_forbidden":
        sections = {"sinusoid": SinusoidSection, "omniglot": OmniglotSection, "image_folder": ImageFolderSection,
                    "text": TextSection}
        owners = [k for k, section in sections.items() if loc[-1] in section.model_fields] if kind else []
        if owners and len(loc) == 2:  # a key of other families: say whose
            return f"{'.'.join(loc)}: not a key of a {kind} family; a key of {', '.join(owners)}"
        near = difflib.get_close_matches(loc[-1], sorted(_section_keys() - {loc[-1]}), n=1)
        return f"{'.'.join(loc)}: unknown key" + (f" (did you mean {near[0]}?)" if near else "")
    return f"{'.'.join(loc) or '<top>'}: {err['msg']}"


def _section_keys(section: type[Section] = Section) -> set[str]:
    """Every key of every config section (the section classes below `section`)."""
    return set(section.model_fields).union(*(_section_keys(sub) for sub in section.__subclasses__()))
