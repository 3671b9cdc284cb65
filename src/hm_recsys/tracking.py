"""MLflow as this project uses it for training runs: experiment setup, logging helpers, the pyfunc model.

* ``configure(settings)``: tracking URI from ``Settings`` (sqlite under the
  runtime folder unless ``MLFLOW_TRACKING_URI`` says otherwise), the
  experiment created with its artifact root under the runtime folder,
  telemetry off.
* Metric names: MLflow accepts ``[/\\w.\\- :]`` only, so ``recall@12`` is
  logged as ``recall_at_12`` and ``repurchase+popularity`` as
  ``repurchase_popularity`` (``metric_key``). The model's holdout metrics are
  logged bare (``recall_at_12``) so the runs table compares them at a glance;
  baselines and the oracle carry their name as prefix
  (``popularity.recall_at_12``), plus ``fraction_of_oracle.recall_at_12``.
* ``TwoTowerPyfunc``: the MLflow model is a ``PythonModel`` whose only
  artifact is the bundle folder; ``load_context`` calls ``bundle.load``. No
  torch module is pickled (the bundle holds a state_dict and the config), the
  package's code travels in ``code/`` and the pip requirements are explicit.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd  # resolved at runtime: MLflow reads predict()'s type hints

if TYPE_CHECKING:
    from hm_recsys.config import Settings
    from hm_recsys.training.epochs import EpochLog

MODEL_ARTIFACT = "model"  # name of the logged model inside a run (runs:/<run_id>/model)
BUNDLE_ARTIFACT = "bundle"  # key of the bundle folder in the pyfunc's artifacts


def configure(settings: Settings) -> str:
    """Point MLflow at ``settings`` and make sure the experiment exists; returns its id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = settings.mlflow_tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(settings.experiment_name)
    if exp is None:
        root = settings.mlflow_artifact_root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        try:
            # No location with a tracking server: its own (proxied) store, reached over HTTP only.
            exp_id = mlflow.create_experiment(settings.experiment_name,
                                              artifact_location=root.as_uri() if root is not None else None)
        except mlflow.exceptions.MlflowException:  # created concurrently by another process
            exp_id = mlflow.get_experiment_by_name(settings.experiment_name).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def metric_key(name: str) -> str:
    """An MLflow-safe metric/param key: ``recall@12`` -> ``recall_at_12``, ``a+b`` -> ``a_b``."""
    return name.replace("@", "_at_").replace("+", "_")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> ``{"a.b.c": "value"}``; lists become JSON text."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{metric_key(str(k))}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = str(v)
    return out


def log_params(params: Mapping[str, Any]) -> None:
    """Log a nested dict as flat params (``config.train.temperature``); long values are truncated to MLflow's limit."""
    flat = {k: v if len(v) <= 6000 else v[:5990] + " ..." for k, v in flatten(params).items()}
    items = list(flat.items())
    for s in range(0, len(items), 90):  # MLflow takes at most 100 params per batch
        mlflow.log_params(dict(items[s:s + 90]))


def log_epoch(log: EpochLog) -> None:
    """Per-epoch metrics (step = epoch) and every 10th step loss (``step_loss``, step = global step)."""
    from mlflow.entities import Metric

    metrics = {
        "train_loss": log.train_loss,
        "epoch_seconds": log.seconds,
        "examples_per_second": log.examples_per_second,
        **{f"valid_{metric_key(k)}": v for k, v in log.valid.items() if k != "n_customers" and np.isfinite(v)},
    }
    mlflow.log_metrics(metrics, step=log.epoch)
    now = int(time.time() * 1000)
    batch = [Metric("step_loss", float(log.step_losses[i]), now, log.first_step + i)
             for i in range(0, len(log.step_losses), 10)]
    run_id = mlflow.active_run().info.run_id
    client = mlflow.MlflowClient()
    for s in range(0, len(batch), 900):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=batch[s:s + 900])


def log_results(results: Mapping[str, Mapping[str, float]], best_epoch: int | None, model_name: str = "served") -> None:
    """Final holdout metrics: the model's bare, every other row prefixed, oracle fractions and lifts.

    ``best_epoch`` None: not logged here (the training run logged it).

    ``lift_vs_best_baseline.*`` compares with the best heuristic on Recall@12
    (``evaluate.best_baseline``), which is what the gate demands beating.
    """
    from hm_recsys.evaluate import BASELINES, ORACLE, best_baseline

    out: dict[str, float] = {} if best_epoch is None else {"best_epoch": float(best_epoch)}
    for name, res in results.items():
        prefix = "" if name == model_name else f"{metric_key(name)}."
        for k, v in res.items():
            if v is not None and np.isfinite(v):
                out[prefix + metric_key(k)] = float(v)
    mine = results[model_name]
    pairs = [(ORACLE, "fraction_of_oracle"), *((b, f"lift_vs_{metric_key(b).replace('-', '_')}") for b in BASELINES)]
    if any(b in results for b in BASELINES):
        pairs.append((best_baseline(results), "lift_vs_best_baseline"))
        mlflow.set_tag("best_baseline", best_baseline(results))
    for other, label in pairs:
        if other in results:
            for k in ("recall@12", "recall@100", "map@12"):
                base = results[other].get(k)
                if base and k in mine:
                    out[f"{label}.{metric_key(k)}"] = float(mine[k] / base)
    mlflow.log_metrics(out)


def log_fusion(fusion) -> None:
    """The fitted fusion: weights as params (``fusion.weight.<feature>``), the fit's facts, ``fusion.json``."""
    params = {f"fusion.weight.{f}": w for f, w in zip(fusion.features, fusion.weights)}
    params.update({f"fusion.fit.{k}": v for k, v in fusion.fitted.items()})
    log_params(params)
    mlflow.log_dict(fusion.to_dict(), "fusion.json")


def log_recall_plot(curves: Mapping[str, np.ndarray], title: str) -> None:
    """``plots/recall_at_k.png``: Recall@K of each model (``log_plots``, and the gate's for a run that left it
    the holdout)."""
    from hm_recsys.evaluate import plot_recall_curves

    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifact(str(plot_recall_curves(curves, Path(tmp) / "recall_at_k.png", title=f"Recall@K, {title}")),
                            "plots")


def log_plots(logs: Sequence[EpochLog], curves: Mapping[str, np.ndarray], title: str) -> None:
    """``plots/recall_at_k.png`` (model vs baselines vs oracle; with ``curves``), ``plots/loss.png``,
    ``plots/valid_recall.png``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if curves:  # none when the run left the holdout to its caller (which logs them: log_recall_plot)
        log_recall_plot(curves, title)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        losses = np.concatenate([np.asarray(e.step_losses, dtype=float) for e in logs])
        fig = Figure(figsize=(8, 4.5), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(np.arange(losses.size), losses, alpha=0.3, label="step")
        w = max(1, losses.size // 50)
        if losses.size >= w:
            smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
            ax.plot(np.arange(w - 1, losses.size), smooth, label=f"moving mean ({w} steps)")
        ends = np.cumsum([len(e.step_losses) for e in logs])
        for x in ends[:-1]:
            ax.axvline(x, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xlabel("step (dotted lines: epoch ends)")
        ax.set_ylabel("sampled softmax loss")
        ax.set_title("training loss")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.savefig(d / "loss.png")
        fig = Figure(figsize=(8, 4.5), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        epochs = [e.epoch for e in logs]
        for k in sorted({k for e in logs for k in e.valid if k.startswith(("recall", "map"))}):
            ax.plot(epochs, [e.valid.get(k, np.nan) for e in logs], marker="o", label=f"valid {k}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation metric")
        ax.set_title("validation week, per epoch (early stopping)")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.savefig(d / "valid_recall.png")
        mlflow.log_artifacts(str(d), "plots")


# ---------------------------------------------------------------------------
# The pyfunc model
# ---------------------------------------------------------------------------
class TwoTowerPyfunc(mlflow.pyfunc.PythonModel):
    """Customer ids (and optionally features) -> top-k article ids, from a bundle.

    Input: a DataFrame with ``customer_id`` (str) and optional feature
    columns (``bundle.FEATURE_OVERRIDES``: ``FN, Active, club_member_status,
    fashion_news_frequency, age, postal_code, recent_articles``) that override
    the stored ones per cell. Params: ``k`` (default 12), ``exclude_purchased``
    (default False). Output: a DataFrame ``customer_id, article_ids, scores``
    (lists, best first).
    """

    def load_context(self, context) -> None:
        from hm_recsys import bundle

        self.rec = bundle.load(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from hm_recsys.bundle import FEATURE_OVERRIDES

        df = _as_frame(model_input)
        params = params or {}
        k = int(params.get("k", 12))
        exclude = bool(params.get("exclude_purchased", False))
        ids = df["customer_id"].astype(str).tolist()
        extra = [c for c in df.columns if c in FEATURE_OVERRIDES and df[c].notna().any()]
        features = df[extra] if extra else None
        rows, scores = self.rec.recommend_rows(ids, k=k, exclude_purchased=exclude, features=features)
        art = np.asarray(self.rec.article_ids, dtype=object)
        keep = np.isfinite(scores)
        return pd.DataFrame({
            "customer_id": ids,
            "article_ids": [list(art[r[m]]) for r, m in zip(rows, keep)],
            "scores": [[float(x) for x in s[m]] for s, m in zip(scores, keep)],
        })


def _as_frame(model_input) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        df = model_input
    elif isinstance(model_input, Mapping):
        df = pd.DataFrame(dict(model_input))
    elif isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
        df = pd.DataFrame({"customer_id": list(model_input)})
    else:
        raise TypeError(f"expected a DataFrame with a customer_id column or a list of ids, "
                        f"got {type(model_input).__name__}")
    if "customer_id" not in df.columns:
        raise ValueError(f"model input has no customer_id column (columns: {list(df.columns)})")
    return df


def signature():
    """Input: customer_id + optional feature columns; params k, exclude_purchased; output: id and score lists."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema([
        ColSpec(DataType.string, "customer_id"),
        ColSpec(DataType.double, "FN", required=False),
        ColSpec(DataType.double, "Active", required=False),
        ColSpec(DataType.string, "club_member_status", required=False),
        ColSpec(DataType.string, "fashion_news_frequency", required=False),
        ColSpec(DataType.double, "age", required=False),
        ColSpec(DataType.string, "postal_code", required=False),
        ColSpec(Array(DataType.string), "recent_articles", required=False),
    ])
    outputs = Schema([
        ColSpec(DataType.string, "customer_id"),
        ColSpec(Array(DataType.string), "article_ids"),
        ColSpec(Array(DataType.double), "scores"),
    ])
    params = ParamSchema([ParamSpec("k", DataType.long, 12), ParamSpec("exclude_purchased", DataType.boolean, False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def pip_requirements() -> list[str]:
    """Exact versions of what ``bundle.load`` and the pyfunc import (no ``+cpu`` local tags)."""
    from importlib.metadata import version

    pins = []
    for dist in ("torch", "numpy", "pandas", "pyarrow", "tqdm", "mlflow"):
        pins.append(f"{dist}=={version(dist).split('+')[0]}")
    return pins


def log_model(bundle_dir: Path, example_ids: Sequence[str], name: str = MODEL_ARTIFACT):
    """Log the bundle as a pyfunc model in the active run; returns MLflow's ``ModelInfo``.

    "Models from code": MLflow stores a three-line script that builds
    ``TwoTowerPyfunc`` instead of a pickled object, the package's source in
    ``code/``, and the bundle folder as the model's artifact.
    """
    import hm_recsys

    example = pd.DataFrame({"customer_id": [str(c) for c in example_ids]})
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "two_tower_pyfunc.py"
        script.write_text(MODEL_SCRIPT)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(script),
            artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
            code_paths=[str(Path(hm_recsys.__file__).parent)],
            signature=signature(),
            input_example=example,
            pip_requirements=pip_requirements(),
        )


MODEL_SCRIPT = """\
# The MLflow model of an hm-recsys two-tower run: everything lives in the bundle artifact.
import mlflow
from hm_recsys.tracking import TwoTowerPyfunc

mlflow.models.set_model(TwoTowerPyfunc())
"""
