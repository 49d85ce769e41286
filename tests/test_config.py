from pathlib import Path

import pytest

from flows.config import ConfigError, StudyConfig, load_config


def write(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_quick_config_loads():
    cfg = load_config("configs/quick.yaml")
    assert cfg.meta_train.algorithms == ("maml", "fomaml", "reptile", "metasgd")
    assert cfg.meta_train.for_algorithm("reptile")["inner_steps"] == 5
    assert cfg.meta_train.for_algorithm("maml")["inner_steps"] == 1


@pytest.mark.parametrize("text, key", [
    ("meta_train: {iterationz: 10}", "meta_train.iterationz"),
    ("meta_train: {iterations: ten}", "meta_train.iterations"),
    ("meta_train: {iterations: 0}", "meta_train.iterations"),
    ("meta_train: {algorithms: [maml, sgd]}", "meta_train.algorithms"),
    ("family: {amplitude: [5.0, 0.1]}", "amplitude"),
    ("evaluate: {steps: -1}", "evaluate.steps"),
    ("runtime: {device: tpu}", "runtime.device"),
    ("colour: blue", "colour"),
    ("meta_train: {zero_head: true}", "meta_train.zero_head"),  # sinusoid: regression, no head
    ("meta_train: {overrides: {maml: {zero_head: true}}}", "meta_train.overrides.maml.zero_head"),
    # all first order: fomaml under maml's name
    ("meta_train: {iterations: 50, overrides: {maml: {first_order_iterations: 50}}}",
     "meta_train.overrides.maml.first_order_iterations: 50 of 50 iterations leaves none second order"),
])
def test_bad_config_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_an_unknown_key_is_called_so_with_the_nearest_known_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "family: {kind: sinusoid, k_shots: 5}\nmeta_train: {fastlr: 0.1, colour: 1}"))
    assert "family.k_shots: unknown key (did you mean k_shot?)" in str(err.value)
    assert "meta_train.fastlr: unknown key (did you mean fast_lr?)" in str(err.value)
    assert "meta_train.colour: unknown key;" in str(err.value) + ";"  # nothing near: no guess


@pytest.mark.parametrize("text, message", [
    ("family: omniglot", "family: a section (a mapping such as {kind: omniglot, ...}) is needed, got 'omniglot'"),
    ("family:", "family: a section (a mapping such as {kind: omniglot, ...}) is needed, got None"),
    ("family: {kind: txt}", "family.kind: 'txt' is not a family kind; one of sinusoid, omniglot, image_folder, text "
                            "(did you mean text?)"),
    ("meta_train: 5", "meta_train: a section (a mapping of keys) is needed, got 5"),
    ("meta_train: {algorithms: maml}", "meta_train.algorithms: a list such as [a, b] is needed, got 'maml'"),
    ("meta_train: {iterations: 1e3}", "got '1e3' (write numbers in YAML as 1000 or 1.0e+3)"),
    ("family: {kind: sinusoid, k_shot: true}", "family.k_shot: a boolean (true) where a number or text is needed"),
    ("meta_train: {fast_lr: false}", "meta_train.fast_lr: a boolean (false) where a number or text is needed"),
    ("family: {kind: sinusoid, amplitude: [true, 2.0]}", "family.amplitude: a boolean"),
    ("family: {kind: sinusoid, test_episodes: e.csv}", "family.test_episodes: not a key of a sinusoid family; a key of "
                                                       "omniglot, image_folder"),  # not "did you mean test_episodes"
])
def test_wrong_shapes_and_types_get_one_line_in_the_configs_terms(tmp_path, text, message):
    """No pydantic internals (discriminator functions, 'valid tuple'), and no true read as 1."""
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2"))


def test_overrides_apply_only_to_their_algorithm():
    cfg = StudyConfig.model_validate({"meta_train": {"fast_lr": 0.02, "overrides": {"metasgd": {"fast_lr": 0.05}}}})
    assert cfg.meta_train.for_algorithm("metasgd")["fast_lr"] == 0.05
    assert cfg.meta_train.for_algorithm("maml")["fast_lr"] == 0.02


def test_overrides_of_algorithms_not_run_are_named():
    cfg = StudyConfig.model_validate({"meta_train": {"algorithms": ["maml"], "overrides": {
        "maml": {"fast_lr": 0.05}, "metasgd": {"fast_lr": 0.05}}}})
    assert cfg.unused_overrides() == ["meta_train.overrides.metasgd: not used, meta_train.algorithms is [maml]"]
    assert StudyConfig.model_validate({"meta_train": {"algorithms": ["maml", "metasgd"], "overrides": {
        "metasgd": {"fast_lr": 0.05}}}}).unused_overrides() == []


def test_omniglot_configs_meta_train_on_the_task_batched_fast_path():
    import torch

    root = Path(__file__).resolve().parents[1]
    for name, chunk in (("omniglot-5w1s", 16), ("omniglot-20w1s", 4)):
        learner = make_learner(load_config(root / "configs" / f"{name}.yaml"), "maml", torch.device("cpu"))
        assert learner.cfg.task_batched and learner.cfg.task_chunk == chunk


def make_learner(cfg, algorithm, device):
    from flows.families import algorithm_settings, family_for

    s = algorithm_settings(cfg, algorithm, cfg.seed)
    return family_for(cfg).learner({}, s.learner, device, cfg.seed, s.zero_head)


def test_zero_head_changes_only_its_algorithms_key_and_zeroes_the_head():
    import torch

    from flows.plan import make_plan

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "omniglot-5w1s.yaml")
    data = cfg.model_dump()
    data["meta_train"]["overrides"] = {"fomaml": {"zero_head": True}}
    on = StudyConfig.model_validate(data)
    assert "zero_head" not in cfg.meta_train.for_algorithm("fomaml")  # off: keys as before the option
    before, after = make_plan(cfg).algorithm_keys, make_plan(on).algorithm_keys
    assert before["maml"] == after["maml"] and before["fomaml"] != after["fomaml"]
    learner = make_learner(on, "fomaml", torch.device("cpu"))
    assert learner.zero_init == ("head.weight", "head.bias")
    assert not learner.params["head.weight"].any() and not learner.params["head.bias"].any()
    assert make_learner(on, "maml", torch.device("cpu")).zero_init == ()


# ---------------------------------------------------------------- cross-field checks at load time

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = "family: {kind: omniglot}\n"
CONV4 = OMNIGLOT + "model: {kind: conv4, %s}\n"
TEXT = "family: {kind: text, %s}\nmodel: {kind: minilm, adapted: head}\n"


def load_error(tmp_path, text) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    return str(err.value)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_its_dump_validates_again(path):
    cfg = load_config(path)
    assert StudyConfig.model_validate(cfg.model_dump()) == cfg


def test_wrong_target_modules_name_the_key_the_file_and_the_names_there(tmp_path):
    from components.text import layer_module_names

    names = layer_module_names()
    assert {"attention.self.query", "attention.self.value", "attention.output.dense"} <= set(names)
    assert "attention.output.LayerNorm" not in names  # peft's LoRA wraps linear modules only
    clinc = (ROOT / "configs" / "clinc150-lora.yaml").read_text()
    message = load_error(tmp_path, clinc.replace("[query, value]", "[q_proj, value, v_proj]"))
    assert message.startswith(f"{tmp_path / 'study.yaml'}: model.target_modules: no module 'q_proj', 'v_proj' in ")
    assert "'value'" not in message and all(name in message for name in names)
    assert "model.target_modules" in load_error(tmp_path, clinc.replace("[query, value]", "[LayerNorm]"))
    assert "at least one" in load_error(tmp_path, clinc.replace("[query, value]", "[]"))
    load_config(write(tmp_path, clinc.replace("[query, value]", "[self.query, dense]")))  # peft matches name endings


@pytest.mark.parametrize("text, key", [
    ("model: {adapted: head}", "model.adapted"),  # the sinusoid mlp adapts everything
    ("model: {lora_r: 8}", "model.lora_r"),
    ("model: {hidden: 32}", "model.hidden"),
    ("model: {sizes: [2, 40, 1]}", "model.sizes"),  # x and y are one value each
    (CONV4 % "lora_r: 8", "model.lora_r"),  # adapted: full
    (CONV4 % "adapted: head, lora_alpha: 16", "model.lora_alpha"),
    (CONV4 % "adapted: lora, target_modules: [conv]", "model.target_modules"),
    (CONV4 % "top_layers: 3", "model.top_layers"),
    (CONV4 % "sizes: [1, 8, 1]", "model.sizes"),
    (TEXT % "n_way: 5" + "model: {kind: minilm, adapted: head, lora_b_std: 0.01}", "model.lora_b_std"),
    (TEXT % "n_way: 5" + "model: {kind: minilm, adapted: head, hidden: 32}", "model.hidden"),
], ids=["mlp-adapted", "mlp-lora_r", "mlp-hidden", "mlp-sizes", "conv4-full-lora_r", "conv4-head-lora_alpha",
        "conv4-target_modules", "conv4-top_layers", "conv4-sizes", "minilm-head-lora_b_std", "minilm-hidden"])
def test_model_fields_only_where_the_model_reads_them(tmp_path, text, key):
    assert f": {key}: " in load_error(tmp_path, text)


def test_model_fields_left_at_their_defaults_are_accepted(tmp_path):
    load_config(write(tmp_path, CONV4 % "adapted: full, hidden: 32, lora_r: 4"))  # lora_r written as its default
    load_config(write(tmp_path, CONV4 % "adapted: lora, lora_r: 8, lora_alpha: 16"))
    load_config(write(tmp_path, "model: {kind: mlp, adapted: full, sizes: [1, 20, 1]}"))


@pytest.mark.parametrize("text, key", [
    ("meta_train: {fast_lr: 0.5}", "meta_train.fast_lr"),  # the default range is [1e-4, 0.1]
    ("meta_train: {overrides: {metasgd: {fast_lr: 0.5}}}", "meta_train.overrides.metasgd.fast_lr"),
    ("meta_train: {algorithms: [maml, metasgd], fast_lr: 0.05, metasgd_lr_range: [0.1, 1.0]}", "meta_train.fast_lr"),
    (OMNIGLOT + "model: {kind: conv4}\nmeta_train: {algorithms: [maml], fast_lr: 0.5}\ntransfer: {algorithm: metasgd}",
     "meta_train.fast_lr"),
])
def test_metasgd_rate_outside_its_range_names_the_fields(tmp_path, text, key):
    message = load_error(tmp_path, text)
    assert f": {key}: " in message and "meta_train.metasgd_lr_range" in message


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd"])
@pytest.mark.parametrize("fast_lr", [0.05, 0.5])
def test_rate_check_is_the_learners_own_rule(tmp_path, algorithm, fast_lr):
    """A config loads exactly when its learner can be built: only Meta-SGD reads metasgd_lr_range today."""
    from components.metalearners import MetaLearnerConfig

    try:
        MetaLearnerConfig(algorithm=algorithm, fast_lr=fast_lr, lr_range=(1e-4, 0.1))
        learner_ok = True
    except ValueError:
        learner_ok = False
    for text in (f"meta_train: {{algorithms: [{algorithm}], fast_lr: {fast_lr}}}",
                 f"meta_train: {{algorithms: [{algorithm}], overrides: {{{algorithm}: {{fast_lr: {fast_lr}}}}}}}"):
        path = write(tmp_path, text)
        try:
            load_config(path)
            config_ok = True
        except ConfigError:
            config_ok = False
        assert config_ok == learner_ok, text


@pytest.mark.parametrize("text, key", [
    ("meta_train: {task_batched: true}", "meta_train.task_batched"),  # conv4 only
    (OMNIGLOT + "model: {kind: conv4}\nmeta_train: {query_chunk: 2}", "meta_train.query_chunk"),
    ("family: {n_tasks: {meta_train: 10, meta_val: 5, meta_test: 5}}\nmeta_train: {meta_batch_size: 11}",
     "meta_train.meta_batch_size"),
    (TEXT % "dataset: csv, path: u.csv, split_by: domain", "family.split_by"),  # no domain_col
    (TEXT % "dataset: banking77" + "transfer: {}", "transfer"),  # no domains to group by
    (TEXT % "dataset: csv, path: u.csv" + "transfer: {}", "transfer"),
], ids=["task_batched-mlp", "query_chunk-unbatched", "meta_batch-over-tasks", "csv-domain-no-column",
        "transfer-banking77", "transfer-csv-no-domain"])
def test_settings_that_cannot_work_stop_at_load(tmp_path, text, key):
    assert f": {key}: " in load_error(tmp_path, text)


def test_sizes_that_depend_on_the_data_are_not_guessed_at_load(tmp_path):
    """Another dataset in CLINC150's layout may have more intents: the config alone cannot bound n_way."""
    load_config(write(tmp_path, TEXT % "n_way: 40, k_shot: 100, n_query: 60"))
    load_config(write(tmp_path, TEXT % "dataset: csv, path: u.csv, n_way: 40, k_shot: 100, n_query: 60"))
    load_config(write(tmp_path, TEXT % "n_way: 5" + "transfer: {n_groups: 12}"))


def test_a_csv_dataset_without_path_is_refused_not_sent_to_clinc150(tmp_path):
    """It used to fall back to the CLINC150 folder silently."""
    assert ": family.path: dataset 'csv' needs the file" in load_error(tmp_path, TEXT % "dataset: csv")
    assert load_config(write(tmp_path, TEXT % "dataset: banking77")).family.path == "../shared/data/banking77"


def test_column_options_of_a_dataset_with_a_fixed_layout_are_refused():
    text = {"kind": "text", "dataset": "banking77"}
    with pytest.raises(ValueError, match="text_col: read only with dataset: csv"):
        StudyConfig.model_validate({"family": {**text, "text_col": "foo"}, "model": {"kind": "minilm", "adapted": "lora"}})
    with pytest.raises(ValueError, match="domain_col: read only with dataset: csv"):
        StudyConfig.model_validate({"family": {**text, "dataset": "clinc150", "domain_col": "area"},
                                    "model": {"kind": "minilm", "adapted": "lora"}})
    StudyConfig.model_validate({"family": {**text, "text_col": "text"}, "model": {"kind": "minilm", "adapted": "lora"}})  # the default
