"""`metapeft`: run the study pipeline, inspect its cache, list, compare and export its runs, open the MLflow UI.

A click group. Prefect and MLflow are imported inside the commands that need them, so `--help`, `--version`,
`stages` and `run --dry-run` start neither. `main(argv)` returns the exit status: 0 ok, 1 a run that failed
(or a check that stopped it before Prefect started), or a run that has no results to read now (`NoResults`), 2 a
usage or config error (an unknown run id, a run of another kind).
"""
from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import click

from flows.environment import configure

DEFAULT_CONFIG = "configs/quick.yaml"
SHIPPED = Path(__file__).resolve().parent.parent  # the checkout holding configs/


def _default_config(ctx, param, value: str) -> str:
    """--config left at its default outside a checkout (no configs/quick.yaml here): the shipped quick study,
    which reads no data files, so `metapeft run` works in any project folder."""
    if value == DEFAULT_CONFIG and not Path(value).exists() and (SHIPPED / DEFAULT_CONFIG).is_file():
        return str(SHIPPED / DEFAULT_CONFIG)
    return value


class StageName(click.Choice):
    """A stage of `flows.plan.STAGES`, read when help or a value needs it (flows.plan imports torch: `metapeft
    --help` stays fast). transfer: a transfer study's own stage names are accepted too (checked per study)."""

    def __init__(self, transfer: bool = False):
        super().__init__((), case_sensitive=True)
        self.transfer = transfer

    @property
    def choices(self) -> tuple[str, ...]:
        from flows.plan import STAGES

        return STAGES

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ sets it
        pass

    def convert(self, value, param, ctx):
        if self.transfer and value not in self.choices:
            from flows.transfer_stages import STAGES as TRANSFER_STAGES

            if value in TRANSFER_STAGES:
                return value
            self.fail(f"{value!r} is not a stage: a pipeline's are {', '.join(self.choices)}; a transfer study's "
                      f"are {', '.join(TRANSFER_STAGES)}" + ("; a fold study's summary over folds is recomputed by "
                                                              "--force significance" if value == "folds" else ""),
                      param, ctx)
        return super().convert(value, param, ctx)


class Metapeft(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args:  # the help, as a success (click's own no_args_is_help exits 2)
            click.echo(ctx.get_help())
            ctx.exit(0)
        return super().parse_args(ctx, args)


@click.group(cls=Metapeft, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="metapeft", prog_name="metapeft")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Compare meta-learning algorithms: run the study pipeline, inspect its cache, list, compare and export
    its runs, open the MLflow UI.

    The project is $METAPEFT_HOME, else the current folder: data/ (the stage cache), mlruns/ (the MLflow
    store), reports/ and .prefect/ live there. `metapeft COMMAND --help` describes a command.
    """
    ctx.obj = configure()


def main(argv: list[str] | None = None) -> int:
    try:
        return cli.main(args=argv, prog_name="metapeft", standalone_mode=False) or 0
    except click.ClickException as e:  # usage errors: 2
        e.show()
        return e.exit_code
    except click.Abort:
        click.echo("metapeft: interrupted", err=True)
        return 130


def _input_error(e: Exception, config: str) -> str:
    """An input file's error found while planning or building: missing (with the config field it came from when
    the message names none) or malformed (its message names file, column and episode)."""
    if not isinstance(e, FileNotFoundError):
        return str(e)
    where = f"in {config}" if "family." in str(e) else f"a file the family section of {config} names"
    return f"{e} ({where}; relative paths are resolved from {Path.cwd()})"


class NoResults(LookupError):
    """A pipeline run that has no results to read now: it stopped before the significance stage, or its results
    are gone or were rewritten by a later run. Not a usage error: exit status 1."""


def lookup_failed(e: LookupError) -> int:
    """A LookupError's message on stderr; its exit status: 1 for `NoResults`, 2 for a run that is not there or
    not a pipeline's."""
    return fail(str(e), 1 if isinstance(e, NoResults) else 2)


def fail(message: str, code: int) -> int:
    click.echo(f"metapeft: {message}", err=True)
    return code


def parse_sets(items: tuple[str, ...]) -> dict:
    """--set key=value items as load_config's overrides, values read as YAML; a dotted key reaches into the
    sections (seed=3, meta_train.iterations=10, family.n_tasks.meta_train=100). ValueError names the item."""
    import yaml

    overrides: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ValueError(f"{item!r}: expected key=value, e.g. seed=3 or meta_train.iterations=10")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{item!r}: the value is not YAML: {getattr(e, 'problem', None) or e}") from None
        node = overrides
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{item!r}: {part} is set to a value above, not a section")
        node[parts[-1]] = value
    return overrides


def _check_sets(ctx, param, items: tuple[str, ...]) -> tuple[str, ...]:
    try:
        parse_sets(items)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None
    return items


@cli.command()
@click.option("--config", default=DEFAULT_CONFIG, metavar="PATH", callback=_default_config,
              help="The study config (outside a checkout the default is the shipped one).")
@click.option("--stage", multiple=True, type=StageName(),
              help="Run only this stage (repeatable): it is recomputed, what it reads comes from the cache.")
@click.option("--from", "first", type=StageName(), default=None,
              help="Run the stages from this one on, as --stage would.  [default: the first]")
@click.option("--until", "last", type=StageName(), default=None,
              help="Run the stages up to this one, as --stage would.  [default: the last]")
@click.option("--force", multiple=True, type=StageName(transfer=True),
              help="Recompute this stage even if cached (repeatable; meta_train starts again). A transfer study "
                   "(a `transfer:` section) takes its own stage names.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", callback=_check_sets,
              help="Override a config value (repeatable); KEY is dotted (seed, meta_train.iterations, "
                   "family.n_tasks.meta_train); VALUE is YAML: 10, 0.5, true, '[maml, reptile]'.")
@click.option("--budget-minutes", type=click.FloatRange(min=0, min_open=True), default=None, metavar="M",
              help="Stop each algorithm's meta-training after M minutes; a rerun goes on from the checkpoint.  "
                   "[default: meta_train.budget_minutes]")
@click.option("--dry-run", is_flag=True,
              help="Print each cache entry's key and whether it would be computed or come from the cache; start "
                   "nothing.")
@click.pass_obj
def run(root: Path, config: str, stage: tuple[str, ...], first: str | None, last: str | None,
        force: tuple[str, ...], sets: tuple[str, ...], budget_minutes: float | None, dry_run: bool) -> int:
    """Run the study, or some of its stages.

    Every stage of the --config study runs, each entry taken from the cache when it is cached there.
    --stage, --from and --until run some stages only; everything they read must be in the cache, and what
    is not is named, all of it, before Prefect starts.
    """
    from flows.config import ConfigError, load_config
    from flows.plan import STAGES, stage_range

    if stage and (first or last):
        raise click.UsageError("--stage cannot be combined with --from / --until")
    try:
        only = set(stage_range(first, last)) if first or last else set(stage)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    overrides = parse_sets(sets)
    if budget_minutes is not None:
        overrides.setdefault("meta_train", {})["budget_minutes"] = budget_minutes
    try:
        cfg = load_config(config, overrides)
        for note in cfg.unused_overrides():  # valid (--set can narrow the algorithms), but maybe misplaced
            click.echo(f"metapeft: note: {note}", err=True)
        if cfg.transfer is not None:  # a transfer study: flows/transfer.py
            return _transfer(cfg, config, root, only, dry_run, force, overrides)
        if unknown := sorted(set(force) - set(STAGES)):
            raise ConfigError(f"--force: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
        if cfg.folds is not None and cfg.family.split_dir is None:  # one pipeline per fold: flows/folds.py
            return _folds(cfg, root, config, only, dry_run, force, overrides)
    except ConfigError as e:
        return fail(f"{e}{' (with --set ' + ', '.join(sets) + ')' if sets else ''}", 2)
    rerun = " ".join(["metapeft run --config", shlex.quote(config), *(f"--set {shlex.quote(s)}" for s in sets)])
    try:
        if dry_run:
            return _dry_run(cfg, root, only, set(force), "--from/--until" if first or last else "--stage", rerun)
        if message := _unready(cfg, root, only, rerun):  # before Prefect starts: every missing entry at once
            return fail(message, 1)
    except (FileNotFoundError, ValueError) as e:  # an input file planning reads: missing or malformed
        return fail(_input_error(e, config), 1)
    return _run(cfg, root, config, sorted(only, key=STAGES.index), list(force), overrides)


def _folds(cfg, root: Path, config: str, only: set[str], dry_run: bool, force: tuple[str, ...],
           overrides: dict) -> int:
    """A study over several split folders: every fold's task sets built and validated before Prefect starts,
    then one pipeline per fold and the summary over folds (`flows.folds.fold_study`)."""
    from flows.cache import CacheWriteError
    from flows.config import ConfigError, check_fold_dirs, fold_overrides, load_config
    from flows.validation import ValidationFailed

    if only:
        raise ConfigError("--stage, --from, --until: a fold study runs every fold whole; run one fold's stages "
                          "with --set family.split_dir=<its folder>")
    if dry_run:
        try:
            return _folds_dry_run(cfg, root, config, set(force), overrides)
        except FileNotFoundError as e:
            return fail(f"{e} (the folds and family.split_root in {config})", 1)
        except ValueError as e:
            return fail(str(e), 1)
    start = time.perf_counter()
    try:  # every fold's task sets: built (again with --force task_sets) and validated, or already cached
        check_fold_dirs(cfg)
        if not force and (cached := _folds_cached(cfg, root, config, overrides)) is not None:
            click.echo(cached)
            return 0
        for fold_set in fold_overrides(cfg, overrides).values():
            preflight(load_config(config, fold_set), root, rebuild="task_sets" in force)
    except FileNotFoundError as e:
        return fail(f"{e} (the folds, family.split_root and family.path in {config})", 1)
    except (ValidationFailed, CacheWriteError, ValueError) as e:
        return fail(str(e), 1)
    from flows.folds import fold_study

    out = fold_study(config_path=config, overrides=overrides or None, force=list(force) or None,
                     prebuilt=["task_sets", "train_sets"])
    click.echo(f"\nfold study {cfg.name} ({config}): {len(cfg.folds)} folds, {time.perf_counter() - start:.1f} s; "
               f"MLflow run {out['run_id']}\n{out['results']}")
    return 0


def _plan(cfg, root: Path):
    """(plan, cache) of the study: no Prefect, no MLflow."""
    from flows.cache import StageCache
    from flows.plan import make_plan

    data_dir = root / cfg.runtime.data_dir
    return make_plan(cfg, data_dir / "inputs.json"), StageCache(data_dir)


def _unready(cfg, root: Path, only: set[str], rerun: str) -> str | None:
    from flows.plan import unready_message, unready_upstream

    from flows.stages.task_sets import write_train_sets

    if not only:  # a whole run computes what is missing
        return None
    plan, cache = _plan(cfg, root)
    write_train_sets(cache, plan)  # from cached task sets of a project older than the train_sets entry
    unready = unready_upstream(plan, cache, only, cfg)
    return unready_message(unready, rerun) if unready else None


def _dry_run(cfg, root: Path, only: set[str], force: set[str], chosen: str, rerun: str) -> int:
    """What `run` would do, from the plan and the cache alone: each entry computed (and why), from the cache,
    or not run; a partial run whose inputs are not all cached fails as the run would."""
    from flows.plan import needed_stages, unready_message, unready_upstream

    plan, cache = _plan(cfg, root)
    counts = _dry_run_lines(plan, cache, _actions(plan, cache, only, force, set(needed_stages(only, cfg)), chosen))
    _dry_run_total(counts)
    if unready := unready_upstream(plan, cache, only, cfg):
        return fail(unready_message(unready, rerun), 1)
    return 0


def _dry_run_lines(plan, cache, action, prefix: str = "", first: dict | None = None) -> Counter:
    """Print '<entry> <key>  <what run would do>' for each entry of one pipeline's plan (names prefixed: a fold's);
    the counts of each kind of action. first (a fold study's): entry -> the fold that computes it first; an entry
    an earlier fold computes (the same key: the prefix every fold shares) comes from the cache after it."""
    from flows.plan import STAGES, stage_entries

    counts = Counter()
    for stage in STAGES:
        for name, entry in stage_entries(plan, stage).items():
            what = action(entry)
            if first is not None and what.startswith("compute") and "--force" not in what:  # forced: every fold
                what = f"cache (fold {first[entry]} computes it first)" if entry in first else what
                first.setdefault(entry, prefix.rstrip("/"))
            counts["unready" if what.endswith("needed from the cache") else what.split()[0].rstrip(",")] += 1
            click.echo(f"{prefix + name:<28} {entry[1]}  {what}")
    return counts


def _dry_run_total(counts: Counter) -> None:
    absent = f", {counts['unready']} needed from the cache but not there" if counts["unready"] else ""
    click.echo(f"dry run: {counts['compute']} to compute, {counts['cache']} from the cache, {counts['not']} not run"
               f"{absent}; nothing was started")


def _folds_dry_run(cfg, root: Path, config: str, force: set[str], overrides: dict) -> int:
    """`run --dry-run` of a fold study: each fold's entries as `_dry_run` shows one pipeline's (named
    '<fold>/<entry>'), then the summary over folds, computed when any fold's results would be or it is not cached."""
    from flows.cache import StageCache
    from flows.config import fold_overrides, load_config
    from flows.folds import fold_plans, summary_key, summary_reads  # imports Prefect, starts nothing
    from flows.plan import needed_stages

    plans, cache, counts = fold_plans(cfg, config, overrides, root), StageCache(root / cfg.runtime.data_dir), Counter()
    recomputed, first = False, {}
    for fold, changes in fold_overrides(cfg, overrides).items():
        plan, fold_cfg = plans[fold], load_config(config, changes)
        action = _actions(plan, cache, set(), force, set(needed_stages(set(), fold_cfg)), "--stage")
        counts += _dry_run_lines(plan, cache, action, f"{fold}/", first)
        recomputed |= any(action(entry) != "cache" for entry in summary_reads({fold: plan}))
    key = summary_key(cfg, plans)
    status = cache.status("folds", key, summary_reads(plans))
    what = "compute (--force)" if "significance" in force else f"compute ({status})" if status != "cached" else \
        "cache, or compute if an entry it reads changes" if recomputed else "cache"
    counts[what.split()[0].rstrip(",")] += 1
    click.echo(f"{'folds':<28} {key}  {what}")
    _dry_run_total(counts)
    return 0


def _actions(plan, cache, only: set[str], force: set[str], needed: set[str], chosen: str):
    """entry -> what `run` would do with it, decided as the flow decides: an entry of a --stage or --force stage
    is recomputed (the text prefix only when not cached); a partial run reads the stages before it from the
    cache; an entry downstream of one recomputed is recomputed only if what it reads changes."""
    from flows.plan import WRITTEN_BESIDE

    from flows.stages.meta_train import resume_note

    graph, memo = plan.graph, {}
    owner = {**WRITTEN_BESIDE, "evaluate_parts": "evaluate"}  # the stage that writes these entries
    unit = {k: label for label, k in plan.algorithm_keys.items()}

    def resume(key: str) -> str:  # how a unit's training would start: from a checkpoint, or afresh beside one
        label = unit[key]
        return resume_note(cache.checkpoint(plan.checkpoint_keys[label]),
                           plan.settings[label].train.iterations)

    def decide(entry) -> str:
        kind, key = entry
        stage, status = owner.get(kind, kind), plan.status(cache, kind, key)
        if stage not in needed:
            return "not run"
        if only and stage not in only:
            return "cache" if status == "cached" else f"{status}: needed from the cache"
        if stage in force and kind not in WRITTEN_BESIDE:
            return "compute (--force)"
        if stage in only and kind not in WRITTEN_BESIDE:
            return f"compute ({chosen})"
        if status != "cached":
            note = resume(key) if kind == "meta_train" and "meta_train" not in force else ""
            if status == "missing" and kind in ("task_sets", *WRITTEN_BESIDE):  # as `stages`: the files that changed
                status = _changed_inputs(cache, kind, key, plan) or status
            return f"compute ({status}{'; ' + note if note else ''})"
        if kind == "meta_train" and cache.manifest(kind, key)["meta"].get("stop_reason") == "budget":
            return "compute (unfinished: goes on from its checkpoint)"
        if any(action(read) != "cache" for read in graph.get(entry, ())):
            return "cache, or compute if an entry it reads changes"
        return "cache"

    def action(entry) -> str:
        if entry not in memo:
            memo[entry] = decide(entry)
        return memo[entry]

    return action


def _run(cfg, root: Path, config: str, only: list[str], force: list[str], overrides: dict) -> int:
    from flows.cache import CacheWriteError
    from flows.validation import ValidationFailed

    start = time.perf_counter()
    try:  # the plan reads the input files, the task sets are built before Prefect: a data error is one line
        plan, cache = _plan(cfg, root)
        if not only and not force and _all_cached(plan, cache, cfg):
            return _nothing_to_run(cfg, root, config, plan, cache)
        if cfg.runtime.runner == "dask" and cfg.runtime.dask_address:  # a scheduler that is not there: one line
            from flows.pipeline import check_scheduler

            check_scheduler(cfg.runtime.dask_address)
        server_ready = _start_prefect_server()  # its start overlaps the task sets' build
        # a later stage run alone reads the task sets from the cache
        built = preflight(cfg, root, rebuild="task_sets" in set(force) | set(only), plan=plan) \
            if not only or "task_sets" in only else ()
    except (FileNotFoundError, ValueError) as e:
        return fail(_input_error(e, config), 1)
    except (ValidationFailed, CacheWriteError) as e:
        return fail(str(e), 1)
    from flows.pipeline import MissingUpstream, meta_pipeline

    try:
        server_ready()
        out = meta_pipeline(config_path=config, stages=only or None, force=force or None,
                            overrides=overrides or None, prebuilt=list(built) or None)
    except (MissingUpstream, ValidationFailed, CacheWriteError) as e:
        return fail(str(e), 1)
    hits = sum(out["hits"].values())
    click.echo(f"\nstudy {cfg.name} ({config}): {len(out['hits'])} stage entries, {hits} from cache, "
               f"{time.perf_counter() - start:.1f} s; MLflow run {out['run_id']}")
    if out["results"]:
        click.echo(out["results"])
    return 0


def _all_cached(plan, cache, cfg) -> bool:
    """Every entry of a whole run is cached: nothing missing, stale or unfinished."""
    from flows.plan import STAGES, needed_stages, stage_entries

    action = _actions(plan, cache, set(), set(), set(needed_stages(set(), cfg)), "--stage")
    return all(action(entry) in ("cache", "not run") for stage in STAGES for entry in stage_entries(plan, stage).values())


def _nothing_to_run(cfg, root: Path, config: str, plan, cache) -> int:
    """A run whose every entry is cached has nothing to do: like make, it starts nothing (no Prefect flow run,
    no MLflow run) and says so, with the results and the MLflow run (and report) that computed them."""
    from flows import report
    from flows.plan import STAGES, stage_entries

    key, sig, family = plan.keys["significance"], cfg.significance, plan.family
    path, source = cache.path("significance", key), cache.manifest("significance", key)["meta"].get("mlflow_run_id")
    n = sum(len(stage_entries(plan, stage)) for stage in STAGES)
    text = report.cached_results_text(path, family.metric, family.reference, sig.alpha, sig.confidence,
                                      report.unfinished_training(cache, cfg, plan.algorithm_keys))
    page = root / "reports" / str(source) / "report.html"
    origin = f"the results of MLflow run {source}" if source else "the cached results"
    click.echo(f"\nstudy {cfg.name} ({config}): {n} stage entries, {n} from cache: nothing to run, no new Prefect "
               f"or MLflow run; "
               f"{origin}{f' (report: {page})' if page.exists() else ''}. --force STAGE recomputes.\n{text}")
    return 0


def _folds_cached(cfg, root: Path, config: str, overrides: dict) -> str | None:
    """A fold study whose every fold's entries and summary over folds are cached has nothing to do: as
    `_nothing_to_run`, what to print (the cached summary, the MLflow run that computed it) with nothing started;
    None when something is to run."""
    from flows.cache import StageCache
    from flows.config import fold_overrides, load_config
    from flows.folds import (fold_plans, fold_unfinished, summary_key, summary_reads,  # imports Prefect, starts
                             summary_text)  # nothing

    plans, cache = fold_plans(cfg, config, overrides, root), StageCache(root / cfg.runtime.data_dir)
    if not all(_all_cached(plans[fold], cache, load_config(config, changes))
               for fold, changes in fold_overrides(cfg, overrides).items()):
        return None
    key = summary_key(cfg, plans)
    if cache.status("folds", key, summary_reads(plans)) != "cached":
        return None
    source = cache.manifest("folds", key)["meta"].get("mlflow_run_id")
    origin = f"the results of MLflow run {source}" if source else "the cached results"
    summary = summary_text(cache.path("folds", key), fold_unfinished(cfg, config, overrides, cache, plans))
    return (f"\nfold study {cfg.name} ({config}): {len(plans)} folds, every entry cached: nothing to run, no new "
            f"Prefect or MLflow run; {origin}. --force STAGE recomputes.\n{summary}")


def _start_prefect_server():
    """Start Prefect's temporary server (about 5 s here, 9 s in a new project, where it creates its database) in
    a thread now, so that its start overlaps what runs before the flow; returns the wait for it. Once this Prefect
    version has set the project's database up, the server skips migrations and block registration
    (`environment.temporary_server_settings`). Nothing to start when PREFECT_API_URL names a server. A start that
    fails here is tried again, and reported, by the flow's own client."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return lambda: None

    def start() -> None:
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import temporary_settings

        from flows.environment import record_database_set_up, temporary_server_settings

        with contextlib.suppress(Exception):
            skip = temporary_server_settings()  # the database's set-up, once it is done (about 0.9 s CPU)
            with temporary_settings(updates=skip):
                SubprocessASGIServer().start()
            if not skip:
                record_database_set_up()

    thread = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    thread.start()
    return thread.join


def preflight(cfg, root: Path, rebuild: bool = False, plan=None) -> tuple[str, ...]:
    """What needs only the config and the data, before Prefect starts (tens of seconds here): the input files
    are read (a missing one is named), and the task sets are built and validated into the cache (again when
    rebuild: --force or --stage task_sets), where the flow then finds them. Returns the entries it wrote
    ("task_sets", "train_sets"), for the flow's `prebuilt`. plan: cfg's, when the caller has made it."""
    from flows.cache import StageCache
    from flows.plan import make_plan, provenance
    from flows.stages.task_sets import build_task_sets, write_train_sets

    data = root / cfg.runtime.data_dir
    plan, cache = plan or make_plan(cfg, data / "inputs.json"), StageCache(data)
    key = plan.keys["task_sets"]
    with cache.lock("task_sets", key):
        if cache.is_complete("task_sets", key) and not rebuild:
            return ("train_sets",) if write_train_sets(cache, plan) else ()  # (task sets older than train_sets)
        print(f"task sets [{key}]: building and validating before the flow starts", file=sys.stderr)
        start, meta = time.perf_counter(), {}
        with cache.writing("task_sets", key, meta) as out:
            meta.update(build_task_sets(plan.family, cfg.seed, out) | provenance(plan, "task_sets"))
            meta["seconds"] = round(time.perf_counter() - start, 3)
        return ("task_sets", "train_sets") if write_train_sets(cache, plan, rebuild) else ("task_sets",)


def _transfer(cfg, config: str, root: Path, only: set[str], dry_run: bool, force: tuple[str, ...],
              overrides: dict) -> int:
    """The transfer study (cfg: the config file `config`, with a `transfer:` section); --force takes its stage
    names."""
    from flows.config import ConfigError
    from flows.transfer_stages import STAGES

    if only:
        raise ConfigError("--stage, --from, --until: a transfer study runs whole; use --force to recompute a stage")
    if overrides:
        raise ConfigError("--set, --budget-minutes: a transfer study takes its settings from its file")
    if unknown := sorted(set(force) - set(STAGES)):
        raise ConfigError(f"--force: unknown transfer stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    from flows.transfer import check_transfer, transfer_study

    try:  # what needs only the config and the data, one line each, before Prefect starts
        check_transfer(cfg)
        if dry_run:
            return _transfer_dry_run(cfg, root, set(force))
    except (FileNotFoundError, ValueError) as e:
        return fail(_input_error(e, config), 1)
    if not force and (cached := _transfer_cached(cfg, config, root)):  # like a fully cached run: nothing started
        click.echo(cached)
        return 0
    start = time.perf_counter()
    out = transfer_study(config_path=config, force=list(force) or None)
    click.echo(f"\ntransfer study {cfg.name} ({config}): {len(out['hits'])} stage entries, "
               f"{sum(out['hits'].values())} from cache, {time.perf_counter() - start:.1f} s; MLflow run "
               f"{out['run_id']}\n{out['results']}")
    return 0


def _transfer_dry_run(cfg, root: Path, force: set[str]) -> int:
    """`run --dry-run` of a transfer study: each entry (`transfer_stages.entries`, named as `stages` names them)
    computed (and why: missing, stale, --force, a source training to go on from its checkpoint) or from the cache;
    an entry whose inputs would be recomputed is from the cache only if they come out the same."""
    from flows.cache import StageCache
    from flows.transfer_stages import entries, make_transfer_plan, unfinished_sources

    plan, cache = make_transfer_plan(cfg), StageCache(root / cfg.runtime.data_dir)
    unfinished, source = unfinished_sources(cfg, cache, plan.source_keys), {k: s for s, k in plan.source_keys.items()}
    fate, counts = {}, Counter()
    for stage, key, read in entries(plan):
        status = cache.status(stage, key, read)
        name = f"{stage}[{source[key]}]" if stage == "transfer_train" else stage
        what = "compute (--force)" if stage in force else f"compute ({status})" if status != "cached" else \
            "compute (unfinished: goes on from its checkpoint)" if stage == "transfer_train" and \
            unfinished.get(f"source {source[key]}") else \
            "cache, or compute if an entry it reads changes" if any(fate[r] != "cache" for r in read) else "cache"
        fate[(stage, key)] = what
        counts[what.split()[0].rstrip(",")] += 1
        click.echo(f"{name:<28} {key}  {what}")
    _dry_run_total(counts)
    return 0


def _transfer_cached(cfg, config: str, root: Path) -> str | None:
    """A transfer study whose every entry is cached, none stale or unfinished: what it would print, and the
    MLflow run that computed it (as `_nothing_to_run` for the pipeline); None when something is to compute."""
    from flows.cache import StageCache
    from flows import transfer_stages as ts
    from flows.report import unfinished_lines

    plan, cache = ts.make_transfer_plan(cfg), StageCache(root / cfg.runtime.data_dir)
    if not ts.fully_cached(cfg, cache, plan):
        return None
    n = len(ts.entries(plan))
    source = cache.manifest("nearest_task", plan.keys["nearest_task"])["meta"].get("mlflow_run_id")
    return (f"\ntransfer study {cfg.name} ({config}): {n} stage entries, {n} from cache: nothing to run, no new "
            f"Prefect or MLflow run; {f'the results of MLflow run {source}' if source else 'the cached results'}. "
            f"--force STAGE recomputes.\n" + "\n".join([ts.results_text(cfg, cache, plan),
                                                           *unfinished_lines(ts.start_notes(cfg, cache,
                                                                                            plan.source_keys))]))


@cli.command()
@click.option("--config", default=DEFAULT_CONFIG, metavar="PATH", callback=_default_config,
              help="The study config (outside a checkout the default is the shipped one).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", callback=_check_sets,
              help="Override a config value, as `run --set` does (repeatable): the entries of that run.")
@click.pass_obj
def stages(root: Path, config: str, sets: tuple[str, ...]) -> int:
    """Each cache entry's key and state.

    States: cached, missing, stale (an entry it reads changed since; for the task sets, an input file), or
    unfinished (a meta-training stopped by its budget: a rerun continues it)."""
    from flows.config import ConfigError, load_config

    try:
        cfg = load_config(config, parse_sets(sets))
    except ConfigError as e:
        return fail(f"{e}{' (with --set ' + ', '.join(sets) + ')' if sets else ''}", 2)
    try:
        if cfg.transfer is not None:
            if sets:  # as `run` refuses them: no keys of a run that cannot be
                return fail("--set: a transfer study takes its settings from its file", 2)
            return _transfer_stages(cfg, root)
        if cfg.folds is not None and cfg.family.split_dir is None:  # each fold's entries, then the summary's
            return _fold_stages(cfg, root, config, parse_sets(sets))
        plan, cache = _plan(cfg, root)
    except (FileNotFoundError, ValueError) as e:
        return fail(_input_error(e, config), 1)
    for line in _stage_lines(plan, cache):
        click.echo(line)
    return 0


def _stage_lines(plan, cache, prefix: str = "") -> list[str]:
    """'<entry> <key>  <state>' of every entry of one pipeline's plan (`stages`), names prefixed (a fold's)."""
    from flows.plan import STAGES, WRITTEN_BESIDE, stage_entries

    lines = []
    for stage in STAGES:
        for name, (written, key) in stage_entries(plan, stage).items():
            state = plan.status(cache, written, key)
            if state == "missing" and written in ("task_sets", *WRITTEN_BESIDE):
                state = _changed_inputs(cache, written, key, plan) or state
            elif state == "cached" and written == "meta_train" and \
                    cache.manifest(written, key)["meta"].get("stop_reason") == "budget":
                meta = cache.manifest(written, key)["meta"]
                state = f"cached, unfinished (budget at iteration {meta.get('iterations_total')}; a rerun continues)"
            lines.append(f"{prefix + name:<28} {key}  {state}")
    return lines


def _fold_stages(cfg, root: Path, config: str, overrides: dict) -> int:
    """`stages` of a fold study: each fold's entries (named '<fold>/<entry>'), then the summary over folds."""
    from flows.cache import StageCache
    from flows.config import check_fold_dirs, fold_overrides
    from flows.folds import fold_plans, summary_key, summary_reads  # imports Prefect, starts nothing

    check_fold_dirs(cfg)
    plans, cache = fold_plans(cfg, config, overrides, root), StageCache(root / cfg.runtime.data_dir)
    for fold in fold_overrides(cfg, overrides):
        for line in _stage_lines(plans[fold], cache, f"{fold}/"):
            click.echo(line)
    key = summary_key(cfg, plans)
    click.echo(f"{'folds':<28} {key}  {cache.status('folds', key, summary_reads(plans))}")
    return 0


def _transfer_stages(cfg, root: Path) -> int:
    """`stages` of a transfer study: its own entries (`flows.transfer_stages.STAGES`, one meta-training per source
    group and the pooled one), cached, unfinished (a source training its time budget stopped: a rerun goes on
    from its checkpoint) or missing."""
    from flows.cache import StageCache
    from flows.transfer_stages import STAGES, make_transfer_plan, unfinished_sources

    plan, cache = make_transfer_plan(cfg), StageCache(root / cfg.runtime.data_dir)
    unfinished = unfinished_sources(cfg, cache, plan.source_keys)
    for stage in ("prefix", *STAGES) if "prefix" in plan.keys else STAGES:
        entries = {f"{stage}[{s}]": (k, unfinished.get(f"source {s}")) for s, k in plan.source_keys.items()} \
            if stage == "transfer_train" else {stage: (plan.keys[stage], None)}
        for name, (key, note) in entries.items():
            state = f"unfinished ({note})" if note else "cached" if cache.is_complete(stage, key) else "missing"
            click.echo(f"{name:<28} {key}  {state}")
    return 0


def _shown_input(inputs: dict[str, str]):
    """name -> how to show an input file `input_content` names relative to the inputs' common folder: as it is,
    or as an absolute path when that folder is the file system's root (inputs in unrelated places)."""
    base = Path(os.path.commonpath([str(Path(p).parent) for p in inputs])) if inputs else None
    return lambda name: str(base / name) if base is not None and base == Path(base.anchor) else name


def _changed_inputs(cache, stage: str, key: str, plan) -> str | None:
    """'stale (...)' naming the input files (relative to their folder) that changed, were added or removed
    since the entry of the same stage built with the same settings whose inputs differ least from these (the
    newest of those), if there is one: an image edited or removed in one dataset is named against that dataset's
    entry, not against the newest entry of another folder read with the same settings."""
    from flows.plan import input_content

    entries = sorted((p for p in (cache.root / stage).glob("[!.]*") if (p / "manifest.json").exists()),
                     key=lambda p: (p / "manifest.json").stat().st_mtime, reverse=True)
    now = dict(input_content(plan.inputs))
    same = [m for m in (cache.manifest(stage, p.name) for p in entries)
            if m and m["meta"].get("settings") == plan.settings_key(stage) and m["meta"].get("inputs")]
    # the fewest files changed, added or removed first, the newest first among equals (a stable sort); the
    # settings key leaves paths out, so entries of other data files or folds are candidates too

    def apart(m: dict) -> int:
        then = dict(input_content(m["meta"]["inputs"]))
        return sum(then.get(name) != now.get(name) for name in then.keys() | now.keys())

    same.sort(key=apart)
    if not same:
        return None
    then, named = dict(input_content(same[0]["meta"]["inputs"])), _shown_input(plan.inputs)
    if not set(then) & set(now):  # no file in common: other data, never built from these files (missing)
        return None
    changed = [f"{named(name)} ({'added' if name not in then else 'changed'})" for name in sorted(now)
               if then.get(name) != now[name]] + [f"{named(name)} (removed)" for name in sorted(set(then) - set(now))]
    if not changed:
        return None
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    return f"stale (inputs changed since entry {same[0]['key']}: {shown})"


@cli.command()
@click.option("--limit", "-n", type=click.IntRange(min=1), default=10, help="How many runs, newest first.")
@click.option("--study", default=None, metavar="NAME", help="Only the runs of this study (its config's name).  "
                                                            "[default: every study]")
@click.pass_obj
def runs(root: Path, limit: int, study: str | None) -> int:
    """Recent pipeline runs and their answers.

    From the MLflow store, newest first: run id, start, status, study, and the answer (the best method, its
    meta-test score and interval); below it the run's --set overrides and the verdict in words."""
    import json

    from flows.tracking import flatten

    try:
        client = _client(root)
    except LookupError as e:
        click.echo(f"no pipeline runs: {e}")
        return 0
    experiments = [e.experiment_id for e in client.search_experiments()]
    where = "tags.`metapeft.config` LIKE '%'" + (f" and attributes.run_name = '{study}'" if study else "")
    found = client.search_runs(experiments, where, max_results=limit, order_by=["attributes.start_time DESC"])
    if not found:
        click.echo(f"no pipeline runs in {client.tracking_uri}" + (f" for study {study!r}" if study else ""))
        return 0
    width = max(16, *(len(r.info.run_name or "") for r in found))  # columns stay aligned under long names
    click.echo(f"{'RUN':<32}  {'STARTED':<16}  {'STATUS':<8}  {'STUDY':<{width}}  {'BEST':<18}  SCORE")
    for r in found:
        started = datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        best, score = r.data.tags.get("metapeft.best_method", "-"), _best_score(r.data.metrics)
        click.echo(f"{r.info.run_id:<32}  {started:<16}  {r.info.status:<8}  {r.info.run_name or '':<{width}}  "
                   f"{best:<18}  {score}")
        if part := _study_part(r.data.tags):
            click.echo(f"    {part}")
        if overrides := r.data.tags.get("metapeft.overrides"):  # what tells two runs of one config apart
            click.echo("    " + " ".join(f"--set {k}={json.dumps(v)}" for k, v in flatten(json.loads(overrides)).items()))
        for note in (r.data.tags.get("metapeft.verdict") or r.data.tags.get("metapeft.error"),
                     r.data.tags.get("metapeft.unfinished")):  # training a budget stopped short
            if note:
                click.echo(textwrap.fill(note, 110, initial_indent=" " * 4, subsequent_indent=" " * 4))
    return 0


def _study_part(tags: dict[str, str]) -> str:
    """What a run is part of, or is, when it is not a lone pipeline: a fold study, one of its folds, a transfer
    study ('' otherwise)."""
    if tags.get("metapeft.kind") == "fold_study":
        return (f"fold study over folds {tags.get('metapeft.folds', '?').replace(',', ', ')}: its folds are pipeline "
                f"runs of their own (report, export and compare take this run or a fold's)")
    if fold := tags.get("metapeft.fold"):
        return f"fold {fold} of fold study {tags.get('mlflow.parentRunId', '?')}"
    if tags.get("metapeft.kind") == "transfer":
        return "transfer study: its table is in the run's artifacts"
    if stages := tags.get("metapeft.stages"):  # --stage, --from, --until
        return f"ran stages {stages.replace(',', ', ')} only"
    return ""


def _best_score(metrics: dict[str, float]) -> str:
    """The answer's score as `mse 0.1234 [0.1100, 0.1300]` (flows/answer.py: best_meta_test_<metric>)."""
    name = next((k for k in metrics if k.startswith("best_meta_test_") and not k.endswith(("_ci_low", "_ci_high"))),
                None)
    if name is None:
        return "-"
    low, high = (metrics.get(f"{name}_ci_{end}", float("nan")) for end in ("low", "high"))
    return f"{name.removeprefix('best_meta_test_')} {metrics[name]:.4g} [{low:.4g}, {high:.4g}]"


@cli.command()
@click.argument("run_a", metavar="RUN_A")
@click.argument("run_b", metavar="RUN_B")
@click.pass_obj
def compare(root: Path, run_a: str, run_b: str) -> int:
    """Two runs' per-method scores side by side.

    Each method's meta-test mean [CI] in run A and run B (pipeline runs, e.g. from `metapeft runs`), and B - A."""
    try:
        (a, cfg_a, keys_a), (b, cfg_b, keys_b) = _results(root, run_a), _results(root, run_b)
    except LookupError as e:
        return lookup_failed(e)
    if a["metric"].iloc[0] != b["metric"].iloc[0]:
        return fail(f"the runs score different metrics ({a['metric'].iloc[0]}, {b['metric'].iloc[0]}): "
                    f"nothing to compare", 2)
    click.echo(f"meta-test {a['metric'].iloc[0]}, mean [CI]; A = {run_a} ({a['study'].iloc[0]}), "
               f"B = {run_b} ({b['study'].iloc[0]})")
    heads = [f"{name} ({t['confidence'].iloc[0]:.0%} CI)" for name, t in (("A", a), ("B", b))]
    click.echo(f"{'method':<20} {heads[0]:>28} {heads[1]:>28} {'B - A':>10}")
    a, b = a.set_index("method"), b.set_index("method")
    for method in dict.fromkeys([*a.index, *b.index]):
        cells = [_score(t.loc[method]) if method in t.index else "-" for t in (a, b)]
        scored = all(method in t.index and not t.loc[method, "diverged"] for t in (a, b))
        diff = f"{b.loc[method, 'mean'] - a.loc[method, 'mean']:+.4g}" if scored else "-"
        click.echo(f"{method:<20} {cells[0]:>28} {cells[1]:>28} {diff:>10}")
    for name, t in (("A", a), ("B", b)):  # ~: training a time budget stopped short
        for method, note in t["unfinished"].items():
            if note:
                click.echo(f"~ {name} {method}: {note}")
    differ = _setting_differences(cfg_a, cfg_b)
    if differ:
        click.echo("settings that differ (A -> B): " + "; ".join(differ))
    units = keys_a.pop("meta_train_units"), keys_b.pop("meta_train_units")
    if all(units):  # the trainings themselves, not the units' names
        keys_a["meta_train"], keys_b["meta_train"] = units
    if changed := [stage for stage in keys_a if stage in keys_b and keys_a[stage] != keys_b[stage]]:
        why = "settings, input files or code changed" if differ else \
            "input files or code changed (the settings are the same)"
        click.echo(f"cache keys that differ: {', '.join(changed)}: their {why}; `metapeft stages --config ...` "
                   f"names changed input files")
    return 0


def _setting_differences(cfg_a, cfg_b) -> list[str]:
    """'key: a -> b' for every config value that differs between two runs' configs (`_run_config`)."""
    from flows.tracking import flatten

    a, b = (flatten(cfg.model_dump(mode="json")) for cfg in (cfg_a, cfg_b))
    return [f"{k}: {a.get(k, '-')} -> {b.get(k, '-')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _score(row) -> str:
    if row["diverged"]:
        return "DIVERGED"
    return f"{row['mean']:.4g} [{row['ci_low']:.4g}, {row['ci_high']:.4g}]{' ~' if row['unfinished'] else ''}"


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", help="The file format.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write it to this file (- : standard output).  [default: standard output]")
@click.pass_obj
def export(root: Path, run_id: str, fmt: str, out: Path | None) -> int:
    """A run's results table, as CSV or JSON.

    One row per method: the meta-test metric's mean and confidence interval, p_holm_vs_reference (the larger of
    the Holm-adjusted paired t-test and Wilcoxon p against the family's reference method: a difference when both
    are below alpha), or where the method diverged."""
    import json

    from components.storage import write_atomic

    to_file = out is not None and str(out) != "-"
    if to_file and not out.parent.is_dir():  # before reading anything
        return fail(f"--out {out}: no folder {out.parent}", 2)
    try:
        table, _, _ = _results(root, run_id)
    except LookupError as e:
        return lookup_failed(e)
    # JSON numbers as Python writes floats (shortest exact repr; pandas' to_json rounds 2.5e-11 to fixed decimals)
    text = table.to_csv(index=False) if fmt == "csv" else \
        json.dumps(table.astype(object).where(table.notna(), None).to_dict("records"), indent=2) + "\n"
    if not to_file:
        click.echo(text, nl=False)
        return 0
    try:
        write_atomic(out, lambda tmp: tmp.write_text(text))
    except OSError as e:
        return fail(f"--out {out}: {e.strerror or e}", 1)
    click.echo(out)
    return 0


RESULT_COLUMNS = ("run_id", "study", "method", "metric", "n", "mean", "ci_low", "ci_high", "confidence", "reference",
                  "p_holm_vs_reference", "replicates", "n_replicates", "better_in_replicates", "p_over_replicates",
                  "diverged", "unfinished")


def _results(root: Path, run_id: str):
    """(the run's results table, its config, its stage keys (+ meta_train_units: its trainings' keys)). The table (RESULT_COLUMNS; best method first, diverged ones last) from
    the significance
    tables the run logged to MLflow (its own results, whoever computed the cache entry), or from its significance
    cache entry when those artifacts are gone. LookupError: no such run; NoResults: one that never reached the
    significance stage (its recorded key names an entry some other run computed)."""
    import pandas as pd

    from flows.cache import DIVERGED, StageCache
    from flows.config import ConfigError
    from flows.families import family_for
    from flows.report import SEED_PAIRS, _pair_p

    if _tags(root, run_id).get("metapeft.kind") == "fold_study":
        return _fold_results(root, run_id)
    try:
        cfg, keys, algorithm_keys, tags = _run_keys(root, run_id, None)
    except ConfigError as e:
        raise LookupError(f"MLflow run {run_id}: its config: {e}") from None
    family, cache, key = family_for(cfg), StageCache(root / cfg.runtime.data_dir), keys["significance"]
    # meta_train's own key hashes the units' names too (maml vs maml/seed0): `compare` compares the trainings' own
    # keys where both runs recorded them (their nested runs' tags)
    keys = {**keys, "meta_train_units": " ".join(sorted(set(algorithm_keys.values())))}
    client = _client(root)
    tables = {name: _logged_table(client, run_id, f"significance/{name}.parquet")
              for name in ("summary", "comparisons", DIVERGED, SEED_PAIRS)}
    if tables["summary"] is None or tables["comparisons"] is None:  # never logged, or the artifacts are gone
        _require_significance(client, run_id, tags, cache, key)
        if not cache.is_complete("significance", key):
            raise NoResults(f"MLflow run {run_id}: its significance artifacts are gone, and so is cache entry "
                              f"significance/{key}; rerun it: {_rerun(tags)}")
        _require_own_entry(run_id, tags, cache, key)
        click.echo(f"MLflow run {run_id}: its significance artifacts are gone; results from cache entry "
                   f"significance/{key}", err=True)
        tables = {name: cache.read_table("significance", key, name) for name in ("summary", "comparisons", DIVERGED)}
        seeds = cache.path("significance", key) / f"{SEED_PAIRS}.parquet"
        tables[SEED_PAIRS] = pd.read_parquet(seeds) if seeds.exists() else None
    ref = family.reference
    rows = [{**{k: r[k] for k in ("method", "n", "mean", "ci_low", "ci_high")}, "diverged": "",
             "p_holm_vs_reference": _pair_p(tables["comparisons"], r["method"], ref),
             **_over_replicates(tables[SEED_PAIRS], r["method"], ref, "seed")}
            for r in tables["summary"].to_dict("records")]
    rows += diverged_rows(tables[DIVERGED], {r["method"] for r in rows})
    study = f"{cfg.name} fold {tags['metapeft.fold']}" if "metapeft.fold" in tags else cfg.name  # names its fold
    return _result_table(rows, run_id, study, family, cfg, _unfinished(tags.get("metapeft.unfinished", ""))), cfg, keys


def _result_table(rows: list[dict], run_id: str, study: str, family, cfg, unfinished: dict[str, str]):
    """The RESULT_COLUMNS table of a run's rows (one per method)."""
    import pandas as pd

    table = pd.DataFrame([{**r, "unfinished": unfinished.get(r["method"], "")} for r in rows])
    table = table.assign(run_id=run_id, study=study, metric=family.metric, confidence=cfg.significance.confidence,
                         reference=family.reference).reindex(columns=list(RESULT_COLUMNS))
    table["replicates"] = table["replicates"].fillna("")
    return table.astype({"n": "Int64", "n_replicates": "Int64", "better_in_replicates": "Int64",
                         "p_over_replicates": float})


def _over_replicates(pairs, method: str, reference: str, unit: str) -> dict:
    """The replicates columns of method against the reference: over the meta-training seeds (unit "seed",
    `seed_pairs`) or the folds (unit "fold", `fold_pairs`); empty where the run has no such table or pair."""
    from components.significance import replicate_record

    found = None if pairs is None or not len(pairs) else replicate_record(pairs, method, reference, unit)
    return {} if found is None else {"replicates": unit, "n_replicates": found["n"],
                                     "better_in_replicates": found["better"], "p_over_replicates": found["p"]}


def _fold_results(root: Path, run_id: str):
    """`_results` of a fold study's own run: per method its mean over folds with the interval over the fold means,
    the pooled-episode p against the reference (Holm, `verdict_p`), and the pair over the folds (replicates
    "fold": in how many folds it was the better, the t-test p over the fold means); from the `folds/` tables the
    run logged, or its folds cache entry when those are gone."""
    import pandas as pd

    from flows.cache import StageCache
    from flows.config import ConfigError
    from flows.families import fold_family
    from flows.report import _pair_p

    client, tags = _client(root), _tags(root, run_id)
    try:
        cfg = _run_config(client, run_id, tags)
    except ConfigError as e:
        raise LookupError(f"MLflow run {run_id}: its config: {e}") from None
    family, key = fold_family(cfg), tags.get("metapeft.key.folds")
    names = ("summary", "comparisons", "fold_pairs", "diverged")
    tables = {name: _logged_table(client, run_id, f"folds/{name}.parquet") for name in names}
    if tables["summary"] is None or tables["comparisons"] is None:  # never logged, or the artifacts are gone
        entry = _fold_entry(run_id, tags, StageCache(root / cfg.runtime.data_dir))
        click.echo(f"MLflow run {run_id}: its summary artifacts are gone; results from cache entry folds/{key}",
                   err=True)
        tables = {name: pd.read_parquet(entry / f"{name}.parquet") for name in names}
    ref = family.reference
    # every row says its interval is over the folds (n is the pooled episodes); against the reference: the pair
    rows = [{"method": r["method"], "n": r["n_episodes"], **{k: r[k] for k in ("mean", "ci_low", "ci_high")},
             "diverged": "", "p_holm_vs_reference": _pair_p(tables["comparisons"], r["method"], ref),
             "replicates": "fold", "n_replicates": r["n_folds"],
             **_over_replicates(tables["fold_pairs"], r["method"], ref, "fold")}
            for r in tables["summary"].to_dict("records")]
    diverged = tables["diverged"]
    if "fold" in diverged:
        rows += [{"method": m, "diverged": "in fold " + ", ".join(map(str, where["fold"])) + ": left out"}
                 for m, where in diverged.groupby("method", sort=False)]
    study = f"{cfg.name} (mean over folds {', '.join(cfg.folds or ())})"
    return _result_table(rows, run_id, study, family, cfg, _unfinished(tags.get("metapeft.unfinished", ""))), cfg, \
        {"folds": key or "", "meta_train_units": ""}


def diverged_rows(diverged, scored: set[str]) -> list[dict]:
    """One results row per diverged method without a score ({method, diverged: where and why}); with seeds, a
    method's rows (one per seed it diverged in) are joined, 'seed 1 in evaluate: ... | seed 2 in ...'."""
    import pandas as pd

    rows = []
    if "method" not in diverged:  # an empty table written without columns
        return rows
    for method, where in diverged.groupby("method", sort=False):
        if method not in scored:
            seeds = where["seed"] if "seed" in where else pd.Series(pd.NA, index=where.index)
            rows.append({"method": method, "diverged": " | ".join(
                f"{'' if pd.isna(seed) else f'seed {int(seed)} '}in {d['stage']}: {d['reason']}"
                for seed, d in zip(seeds, where.to_dict("records")))})
    return rows


def _unfinished(tag: str) -> dict[str, str]:
    """method -> where a budget stopped its meta-training, from a run's metapeft.unfinished tag ("maml: meta-training
    stopped ...; fomaml: ..."; with seeds, "maml/seed1: ..." notes join under their method)."""
    notes: dict[str, list[str]] = {}
    for item in filter(None, tag.split("; ")):
        label, note = item.split(": ", 1)
        fold = ""
        if label.startswith("fold "):  # a fold study's: "fold 01 maml" or "fold 01 maml/seed1"
            _, fold, label = label.split(" ", 2)
        where = " ".join(filter(None, [f"fold {fold}" if fold else "", label if "/" in label else ""]))
        notes.setdefault(label.split("/")[0], []).append(f"{where}: {note}" if where else note)
    return {method: "; ".join(n) for method, n in notes.items()}


def _logged_table(client, run_id: str, path: str):
    """A Parquet table the run logged as an artifact; None when it has none there (an empty frame for the
    diverged table, which older runs did not log)."""
    import tempfile

    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        try:
            return pd.read_parquet(client.download_artifacts(run_id, path, tmp))
        except Exception:  # MlflowException, OSError: not logged, or the artifacts are gone
            return pd.DataFrame(columns=["method", "stage", "reason"]) if path.endswith("diverged.parquet") else None


def _fold_entry(run_id: str, tags: dict, cache) -> Path:
    """The folds cache entry of a fold study's run, when this run computed it (an entry under the same key written
    by another run, e.g. after one fold's results were rewritten, holds that run's numbers). NoResults otherwise."""
    key = tags.get("metapeft.key.folds")
    if key is None:
        raise NoResults(f"MLflow run {run_id}: a fold study run that logged no summary tables and predates the "
                        f"summary's key tag (metapeft.key.folds); rerun it: {_rerun(tags)}")
    if not cache.is_complete("folds", key):
        raise NoResults(f"MLflow run {run_id}: its summary tables were not logged and cache entry folds/{key} is not "
                        f"there (it stopped before its summary, or the entry is gone); rerun it: {_rerun(tags)}")
    if (by := _computed_by(cache, key, "folds")) != run_id:
        raise NoResults(f"MLflow run {run_id}: its summary tables were not logged, and cache entry folds/{key} is "
                        f"MLflow run {by}'s, not this run's results; rerun it: {_rerun(tags)}")
    return cache.path("folds", key)


def _fold_report(root: Path, run_id: str, tags: dict, out: Path | None) -> int:
    """`report` of a fold study's own run: `report_page.fold_study_report` from the summary tables it logged (else
    its own folds cache entry), logged to it."""
    import tempfile

    from flows.cache import StageCache
    from flows.config import ConfigError
    from flows.families import fold_family
    from flows.report_page import fold_study_report

    client = _client(root)
    try:
        cfg = _run_config(client, run_id, tags)
    except ConfigError as e:
        return fail(f"MLflow run {run_id}: its config: {e}", 2)
    runs = client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    fold_pages = {r.data.tags["metapeft.fold"]: root / "reports" / r.info.run_id / "report.html"
                  for r in sorted(runs, key=lambda r: r.data.tags.get("metapeft.fold", "")) if "metapeft.fold" in r.data.tags}
    unfinished = dict(item.split(": ", 1) for item in tags.get("metapeft.unfinished", "").split("; ") if ": " in item)
    out = out or root / "reports" / run_id / "report.html"
    with tempfile.TemporaryDirectory() as tmp:  # its own cache entry (it says when it was computed), else the
        try:  # tables the run logged
            entry = _fold_entry(run_id, tags, StageCache(root / cfg.runtime.data_dir))
        except LookupError as e:
            with contextlib.suppress(Exception):  # MlflowException, OSError: not logged, or the artifacts are gone
                entry = Path(client.download_artifacts(run_id, "folds", tmp))
            if not (Path(tmp) / "folds" / "summary.parquet").is_file():
                return lookup_failed(e)
        fold_study_report(cfg, fold_family(cfg), entry, fold_pages, out, run_id, unfinished)
    client.log_artifact(run_id, str(out))
    click.echo(out)
    return 0


def _computed_by(cache, key: str, stage: str = "significance") -> str | None:
    """The MLflow run that computed the entry of stage (significance; folds: a fold study's summary) now cached
    under key (None: no entry, or an old one)."""
    return ((cache.manifest(stage, key) or {}).get("meta") or {}).get("mlflow_run_id")


def _tags(root: Path, run_id: str) -> dict:
    """run_id's tags. LookupError: no MLflow store, or no such run."""
    client = _client(root)
    try:
        return client.get_run(run_id).data.tags
    except Exception as e:  # MlflowException: unknown run id
        raise LookupError(f"MLflow run {run_id}: {e}") from None


def _require_significance(client, run_id: str, tags: dict, cache, key: str) -> None:
    """NoResults unless run_id (tags: its tags) reached the significance stage: it took the entry from the cache
    (tag metapeft.results_parent), logged the study's answer, logged the significance tables, or computed the
    entry. A partial run (`--until task_sets`) still records every stage's key, and the entry of that key may be
    another run's: its results are not this run's."""
    if {"metapeft.results_parent", "metapeft.best_method"} & set(tags) or _computed_by(cache, key) == run_id:
        return
    with contextlib.suppress(Exception):  # MlflowException, OSError: no artifacts there
        if any(f.path.endswith("summary.parquet") for f in client.list_artifacts(run_id, "significance")):
            return
    raise NoResults(f"MLflow run {run_id} did not run the significance stage: it has no results; `metapeft runs` "
                      f"lists the runs that have")


def _require_own_entry(run_id: str, tags: dict, cache, key: str, client=None) -> None:
    """NoResults unless the significance entry now cached under key holds run_id's results: computed by it, the
    entry it took from the cache (tag metapeft.results_parent), or (client given) tables equal to those the run
    logged. A later run rewrites an entry under the same key when what it reads was rewritten (a meta-training
    continued with --budget-minutes; `--stage significance`, which may give the same numbers)."""
    computed_by = _computed_by(cache, key)
    if computed_by is None or computed_by in (run_id, tags.get("metapeft.results_parent")):
        return
    if client is not None and all(
            (logged := _logged_table(client, run_id, f"significance/{name}.parquet")) is not None
            and logged.equals(cache.read_table("significance", key, name)) for name in ("summary", "comparisons")):
        return
    raise NoResults(f"MLflow run {run_id}: cache entry significance/{key} now holds the results of run "
                      f"{computed_by}, computed after it (e.g. a meta-training continued with --budget-minutes); "
                      f"this run's own report is the report.html logged to it (reports/{run_id}/report.html)")


def _rerun(tags: dict) -> str:
    """The command that reruns a run (tags: its tags): its config file (tag metapeft.config), its --set overrides."""
    import json

    from flows.tracking import flatten

    sets = flatten(json.loads(tags.get("metapeft.overrides", "null")) or {})
    return shlex.join(["metapeft", "run", "--config", tags["metapeft.config"],
                       *(a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}"))])


@cli.command()
@click.option("--host", default="127.0.0.1", help="The interface to bind (loopback: this machine only).")
@click.option("--port", default="5000", help="The port.")
@click.pass_obj
def ui(root: Path, host: str, port: str) -> int:
    """Start the MLflow UI over the project's store.

    With MLFLOW_TRACKING_URI naming a tracking server, print its address instead."""
    from flows.tracking import default_tracking_uri

    uri = default_tracking_uri(root)
    if uri.startswith(("http://", "https://")):  # MLFLOW_TRACKING_URI names a tracking server: it is the UI
        click.echo(f"MLflow UI: {uri} (MLFLOW_TRACKING_URI is a tracking server; nothing to start)")
        return 0
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--default-artifact-root", (root / "mlruns" / "artifacts").as_uri(),
           "--host", host, "--port", port, "--workers", "1"]
    click.echo(f"MLflow UI on http://{host}:{port} (Ctrl-C stops it)")
    return subprocess.call(cmd, env=env)


@cli.command()
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--prefect-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The deployments file.  [default: deployments/prefect.yaml]")
def serve(names: tuple[str, ...], prefect_file: Path | None) -> int:
    """Serve deployments from this process.

    The named deployments of the deployments file (all of them by default), until interrupted. Needs a Prefect
    server: PREFECT_API_URL."""
    from flows.schedules import PREFECT_FILE, serve as serve_deployments

    try:
        serve_deployments(list(names), prefect_file or PREFECT_FILE)
    except (ValueError, FileNotFoundError) as e:  # no such file or deployment, PREFECT_API_URL unset
        return fail(str(e), 2)
    except ConnectionError as e:  # no server answers at PREFECT_API_URL
        return fail(str(e), 1)
    return 0


@cli.command()
@click.argument("run_id", required=False, metavar="[RUN_ID]")
@click.option("--config", default=None, metavar="PATH",
              help=f"The study config.  [default: the run's own, or {DEFAULT_CONFIG} without RUN_ID]")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file.  [default: reports/RUN_ID/report.html]")
@click.pass_obj
def report(root: Path, run_id: str | None, config: str | None, out: Path | None) -> int:
    """Rewrite a run's HTML report from the cache.

    The report of RUN_ID is logged to that run; without RUN_ID, the --config study's is logged nowhere."""
    from flows.cache import StageCache
    from flows.config import ConfigError
    from flows.report_page import study_report

    try:
        if run_id and config is None and (tags := _tags(root, run_id)).get("metapeft.kind") == "fold_study":
            return _fold_report(root, run_id, tags, out)
        cfg, keys, algorithm_keys, tags = _run_keys(root, run_id, config)
    except ConfigError as e:
        return fail(str(e), 2)
    except LookupError as e:
        return lookup_failed(e)
    cache = StageCache(root / cfg.runtime.data_dir)
    if run_id:  # the entry of its key may be another run's
        try:
            _require_significance(_client(root), run_id, tags, cache, keys["significance"])
            _require_own_entry(run_id, tags, cache, keys["significance"], _client(root))
        except LookupError as e:
            return lookup_failed(e)
    if not cache.is_complete("significance", keys["significance"]):
        return fail(f"no cached significance entry {keys['significance']} for study {cfg.name!r}; run the pipeline "
                    f"first", 1)
    out = out or root / "reports" / (run_id or cfg.name) / "report.html"
    study_report(cfg, cache, keys, algorithm_keys, out, run_id)
    if run_id:
        _client(root).log_artifact(run_id, str(out))
    click.echo(out)
    return 0


def _run_keys(root: Path, run_id: str | None, config: str | None):
    """(config, stage keys, algorithm keys, tags) of an MLflow parent run (its tags; the config it stored, or the
    file `config` with its --set overrides applied), or of a config file (no tags). LookupError: no such pipeline
    run."""
    import json

    from flows.config import load_config
    from flows.plan import make_plan

    if run_id is None:
        cfg = load_config(config or DEFAULT_CONFIG)
        if cfg.transfer is not None or (cfg.folds is not None and cfg.family.split_dir is None):
            kind = "a transfer study" if cfg.transfer is not None else "a fold study"
            raise LookupError(f"{config or DEFAULT_CONFIG} is {kind}: report --config takes one pipeline; give the "
                              f"study's MLflow run instead (`metapeft runs`{': report RUN_ID' if cfg.folds else ''})")
        plan = make_plan(cfg, root / cfg.runtime.data_dir / "inputs.json")
        return cfg, plan.keys, plan.algorithm_keys, {}
    client = _client(root)
    try:
        run = client.get_run(run_id)
    except Exception as e:  # MlflowException: unknown run id
        raise LookupError(f"MLflow run {run_id}: {e}") from None
    tags = run.data.tags
    if tags.get("metapeft.kind") in ("fold_study", "transfer"):  # studies of their own kind: say so, name the pipelines
        folds = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
        named = ", ".join(f"fold {r.data.tags.get('metapeft.fold', '?')}: {r.info.run_id}"
                          for r in sorted(folds, key=lambda r: r.data.tags.get("metapeft.fold", ""))
                          if "metapeft.key.significance" in r.data.tags)
        kind = {"fold_study": "fold study", "transfer": "transfer study"}[tags["metapeft.kind"]]
        whole = "report without --config, export and compare take the study's run" if kind == "fold study" else \
            "the study's own table is in its run's artifacts"
        raise LookupError(f"MLflow run {run_id} is a {kind}: this takes one pipeline's run"
                          + (f" ({named})" if named else "") + f"; {whole}")
    if "metapeft.key.significance" not in tags:
        raise LookupError(f"MLflow run {run_id} is not a metapeft pipeline run (no metapeft.key.* tags)")
    keys = {k.removeprefix("metapeft.key."): v for k, v in tags.items() if k.startswith("metapeft.key.")}
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    algorithm_keys = {c.info.run_name: c.data.tags["metapeft.meta_train_key"] for c in children
                      if "metapeft.meta_train_key" in c.data.tags}
    if config:  # --config: that file, with the run's overrides, when it describes the run's results
        cfg = load_config(config, json.loads(tags.get("metapeft.overrides", "null")))
        mine = make_plan(cfg, root / cfg.runtime.data_dir / "inputs.json").keys["significance"]
        if mine != keys["significance"]:
            raise LookupError(f"--config {config}: its study (significance entry {mine}) is not MLflow run {run_id}'s "
                              f"({keys['significance']}): its settings, data or code differ; leave --config out to "
                              f"use the run's own settings")
        return cfg, keys, algorithm_keys, tags
    return _run_config(client, run_id, tags), keys, algorithm_keys, tags


def _run_config(client, run_id: str, tags: dict):
    """The settings run_id ran with: its config.json artifact (the validated config, --set overrides applied,
    logged when the run started), never its config file, which may have changed or moved since. A run logged
    before runs stored it gets its file as it is now (its overrides applied), and stderr says so."""
    import json
    import tempfile

    from flows.config import ConfigError, StudyConfig, load_config

    with tempfile.TemporaryDirectory() as tmp:
        try:
            stored = json.loads(Path(client.download_artifacts(run_id, "config.json", tmp)).read_text())
        except Exception:  # MlflowException, OSError: not logged (an older run), or its artifacts are gone
            stored = None
    if stored is None:
        path = tags["metapeft.config"]
        click.echo(f"MLflow run {run_id} did not store its config: read from {path} as it is now", err=True)
        return load_config(path, json.loads(tags.get("metapeft.overrides", "null")))
    try:
        return StudyConfig.model_validate(stored)
    except ValueError as e:  # pydantic's ValidationError: a config of an older metapeft
        raise ConfigError(f"its stored config.json no longer validates: {e}") from None


def _client(root: Path):
    """An MlflowClient of the project's store. LookupError: the default SQLite store does not exist yet (opening
    it would create it)."""
    from flows.tracking import default_tracking_uri

    uri = default_tracking_uri(root)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise LookupError(f"no MLflow store at {uri.removeprefix('sqlite:///')}: no pipeline has run in {root}")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


if __name__ == "__main__":
    sys.exit(main())
