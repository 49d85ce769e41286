"""A meta-learned start as an MLflow pyfunc model: given a support set, it adapts and predicts the queries.

    model = mlflow.pyfunc.load_model("models:/quick-maml/latest")
    model.predict({"x_spt": x_spt, "y_spt": y_spt, "x_qry": x_qry}, params={"steps": 10})

The input is one task: a dict of arrays, or a DataFrame with columns `x`, `y` and `role` ("support" or
"query"; the queries' `y` is ignored). x is what the family's network reads: sinusoid (K,) or (K, 1) floats;
images (K, C, H, W) floats in [0, 1], as the task sets hold them; text: the utterances as strings (the model
then runs the bundled MiniLM's frozen layers on them). y: regression targets, or any N class labels (N: the
study's n_way). The start is adapted with `steps` SGD steps at its (Meta-SGD: learned) inner rates; the
default is the study's evaluate.steps. predict returns a DataFrame: column `prediction` (the value, or the
predicted label), and for classification one probability column `p_<label>` per class.

The model keeps the unit's state.pt and the study config (study.json) and rebuilds the learner with the
project's code (`flows.families`), so it loads where the metapeft package is installed. Logged by
`flows.tracking.Tracker.log_model` only when a meta-training was computed, never on a cache hit.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from torch.func import functional_call

STATE, STUDY = "state", "study"  # artifact names inside the model
CODE = Path(__file__).with_name("model_code.py")  # the model's code file (MLflow's "models from code")


def study_spec(cfg, algorithm: str, seed: int) -> dict:
    """What load_context needs besides the state: the study config, the unit and the default test-time steps."""
    return {"config": cfg.model_dump(mode="json"), "algorithm": algorithm, "seed": seed, "steps": cfg.evaluate.steps}


def signature(steps: int):
    """No input schema (a dict of arrays per task); one parameter, the test-time steps."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ModelSignature(inputs=None, params=ParamSchema([ParamSpec("steps", "long", steps)]))


class MetaLearnedStart(mlflow.pyfunc.PythonModel):
    _skip_type_hint_validation = True  # MLflow's type-hint schemas cannot say "a dict of arrays or a DataFrame"

    def load_context(self, context) -> None:
        from components.families import ClassificationTasks
        from components.storage import load_tensors
        from flows.config import StudyConfig
        from flows.families import algorithm_settings, family_for

        spec = json.loads(Path(context.artifacts[STUDY]).read_text())
        cfg = StudyConfig.model_validate(spec["config"])
        self.family = family_for(cfg)
        self.settings = algorithm_settings(cfg, spec["algorithm"], spec["seed"])
        self.steps = spec["steps"]
        self.classify = isinstance(self.family, ClassificationTasks)
        self.state = load_tensors(context.artifacts[STATE])

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        steps = int((params or {}).get("steps", self.steps))
        if steps < 0:
            raise ValueError(f"params.steps: need >= 0 SGD steps on the support set, got {steps}")
        x_spt, y_spt, x_qry = _task(model_input)
        if not self.classify and not np.isfinite(np.asarray(y_spt, dtype=float)).all():
            raise ValueError("y_spt: non-finite values; the adapted start would predict nan")
        classes = np.unique(y_spt) if self.classify else None
        if self.classify and len(classes) != self.family.data.n_way:
            raise ValueError(f"y_spt: the model's head is {self.family.data.n_way}-way (the study's n_way); the "
                             f"support set has {len(classes)} labels")
        tables, x_spt, x_qry = self._inputs(x_spt, x_qry)
        if not torch.isfinite(x_spt).all() or not torch.isfinite(x_qry).all():
            raise ValueError("x_spt, x_qry: non-finite values")
        learner = self.family.learner(tables, self.settings.learner, torch.device("cpu"), self.settings.train.seed,
                                      self.settings.zero_head)
        learner.load_state_dict(self.state)
        y = torch.as_tensor(np.searchsorted(classes, y_spt)) if self.classify else _column(y_spt)
        fast = learner.adapt_batch(x_spt[None], y[None], steps)  # {name: (1, *shape)}
        with torch.no_grad():
            out = functional_call(learner.model, {**learner.frozen, **{k: v[0] for k, v in fast.items()}}, (x_qry,))
        if not self.classify:
            return pd.DataFrame({"prediction": out.squeeze(-1).numpy()})
        probs = out.softmax(-1).numpy()  # (Q, N)
        return pd.DataFrame({"prediction": classes[probs.argmax(-1)],
                             **{f"p_{c}": probs[:, i] for i, c in enumerate(classes)}})

    def _inputs(self, x_spt: np.ndarray, x_qry: np.ndarray) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(tables, x_spt, x_qry) as the family's network reads them; text: row ids into a prefix of these texts."""
        if hasattr(self.family, "build_prefix"):
            from components import text

            texts = [str(t) for t in (*x_spt, *x_qry)]
            prefix, _, _ = text.encode_utterances(texts, self.family.model_settings.top_layers,
                                                  self.family.data.source.max_length)
            frame = pd.DataFrame({"text": texts})
            rows = torch.arange(len(texts))
            return {"prefix": prefix, "texts": frame, "utterances": frame}, rows[:len(x_spt)], rows[len(x_spt):]
        x_spt, x_qry = (torch.as_tensor(np.asarray(x, dtype=np.float32)) for x in (x_spt, x_qry))
        if x_spt.ndim == 1:  # sinusoid x as a vector
            x_spt, x_qry = x_spt[:, None], x_qry[:, None]
        sizes = self.family.model_settings if isinstance(self.family.model_settings, tuple) else None  # MLP widths
        for name, x in (("x_spt", x_spt), ("x_qry", x_qry)):
            if sizes and (x.ndim != 2 or x.shape[1] != sizes[0]):
                raise ValueError(f"{name}: need shape (points, {sizes[0]}) for this model's input, got "
                                 f"{tuple(x.shape)}")
        return {}, x_spt, x_qry


def _task(model_input) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x_spt, y_spt, x_qry) from a dict of arrays or a DataFrame with x, y and role."""
    if isinstance(model_input, pd.DataFrame):
        missing = {"x", "y", "role"} - set(model_input.columns)
        if missing:
            raise ValueError(f"model input: a DataFrame needs columns x, y and role; missing {sorted(missing)}")
        support, query = (model_input[model_input["role"] == r] for r in ("support", "query"))
        model_input = {"x_spt": np.stack(support["x"].to_numpy()), "y_spt": support["y"].to_numpy(),
                       "x_qry": np.stack(query["x"].to_numpy())}
    missing = {"x_spt", "y_spt", "x_qry"} - set(model_input)
    if missing:
        raise ValueError(f"model input: need x_spt, y_spt and x_qry; missing {sorted(missing)}")
    x_spt, y_spt, x_qry = (np.asarray(model_input[k]) for k in ("x_spt", "y_spt", "x_qry"))
    if len(x_spt) != len(y_spt) or not len(x_spt) or not len(x_qry):
        raise ValueError(f"model input: need a non-empty support set with one y per x and at least one query; "
                         f"got {len(x_spt)} x_spt, {len(y_spt)} y_spt, {len(x_qry)} x_qry")
    return x_spt, y_spt, x_qry


def _column(y: np.ndarray) -> torch.Tensor:
    """Regression targets (K,) or (K, 1) -> (K, 1) float32."""
    y = torch.as_tensor(np.asarray(y, dtype=np.float32))
    return y[:, None] if y.ndim == 1 else y
