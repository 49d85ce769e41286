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
])
def test_bad_config_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and str(path) in str(err.value)


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


def test_omniglot_configs_meta_train_on_the_task_batched_fast_path():
    import torch

    from flows.stages import make_learner

    root = Path(__file__).resolve().parents[1]
    for name, chunk in (("omniglot-5w1s", 16), ("omniglot-20w1s", 4)):
        learner = make_learner(load_config(root / "configs" / f"{name}.yaml"), "maml", torch.device("cpu"))
        assert learner.cfg.task_batched and learner.cfg.task_chunk == chunk


def test_zero_head_changes_only_its_algorithms_key_and_zeroes_the_head():
    import torch

    from flows.plan import make_plan
    from flows.stages import make_learner

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
