"""Airflow UI plugin: from a pipeline run to its MLflow run, model version and serving endpoint.

What it adds to the Airflow 3 UI (no Flask/FAB views; those are legacy in Airflow 3):

* **Extra links** on every task instance of a run (``global_operator_extra_links``),
  computed by the API server from the run's XCom return values:

  ``MLflow run``        the run a ``train`` task reported as ``{"mlflow_run_id": ...}``
                        (in its experiment once a result names both, as ``evaluate``'s
                        does; before that MLflow's direct ``#/runs/<id>`` route)
  ``Model version``     the version a ``register`` task reported as ``{"version": ...}``
                        (``model_name`` when present, else the configured model name)
  ``Serving metadata``  the recommendation service's ``/metadata``, once the run's ``deploy`` (hm_retrain)
                        or ``switch_service`` (hm_refresh) task succeeded
  ``Live quality``      the champion's monitoring run in MLflow, on its chart of the served state's
                        live Recall@12 per week, as an ``hm_refresh`` run's ``live_quality`` task
                        reported it (``{"monitor_run_id": ..., "monitor_experiment_id": ...}``); the
                        latest figure is in that task's log and the run's ``live.latest`` tag

  A link whose reference is not in the run (an ``hm_ingest`` run, a retrain run
  that failed before ``train``) is empty, and the UI hides an empty link.
  The task's own result wins; otherwise the earliest task of the run that
  reported the key (``register`` before ``promote``/``report``).

* **Menu entries** (``external_views``, category ``hm-recsys``): the MLflow UI
  and the service's ``/metadata``. Both open in a new tab: MLflow refuses to
  be framed by another origin, so an iframe view would show nothing.

No custom operator or hook: every task body is already one call into
``hm_recsys.pipeline`` (see ``dags/``); an operator would only hide that call.

Configuration (read when the plugin is loaded and when a link is computed,
never at import). URLs are what a *browser* opens, not container names:

``HM_RECSYS_MLFLOW_UI``   default ``http://127.0.0.1:$HM_RECSYS_MLFLOW_PORT`` (port default 5000)
``HM_RECSYS_SERVE_URL``   default ``http://127.0.0.1:$HM_RECSYS_SERVE_PORT`` (port default 3000)
``HM_RECSYS_MODEL_NAME``  default: ``hm_recsys.config.Settings.registered_model_name``

Importing this file is cheap (stdlib and Airflow's plugin base class): every
component (scheduler, workers, dag processor) loads plugins, and none of
them should pay for MLflow, torch or a database query to do so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

MLFLOW_RUN = "MLflow run"
MODEL_VERSION = "Model version"
SERVING_METADATA = "Serving metadata"
LIVE_QUALITY = "Live quality"
LINK_NAMES = (MLFLOW_RUN, MODEL_VERSION, SERVING_METADATA, LIVE_QUALITY)
LIVE_METRIC = "live.recall_at_12"

# The tasks whose success means "this run changed what the service serves".
DEPLOY_TASKS = ("deploy", "switch_service")


# -- configuration --------------------------------------------------------------------
def _http_url(env: Mapping[str, str], var: str, default: str) -> str:
    value = (env.get(var) or default).strip().rstrip("/")
    if not value.startswith(("http://", "https://")) or value in {"http:", "https:"}:
        raise ValueError(f"{var} must be an http(s):// URL that a browser can open, got {value!r}")
    return value


@dataclass(frozen=True)
class UiConfig:
    """Where a browser reaches MLflow and the service; the registered model's name."""

    mlflow_ui: str
    serve_url: str
    model_name: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> UiConfig:
        """Read the three settings; raise ``ValueError`` naming the variable if a URL is not http(s)."""
        env = os.environ if env is None else env
        mlflow_port = env.get("HM_RECSYS_MLFLOW_PORT") or "5000"
        serve_port = env.get("HM_RECSYS_SERVE_PORT") or "3000"
        model_name = env.get("HM_RECSYS_MODEL_NAME")
        if not model_name:
            # Local import: the package is cheap, but only this branch needs it.
            from hm_recsys.config import Settings

            model_name = Settings.registered_model_name
        return cls(
            mlflow_ui=_http_url(env, "HM_RECSYS_MLFLOW_UI", f"http://127.0.0.1:{mlflow_port}"),
            serve_url=_http_url(env, "HM_RECSYS_SERVE_URL", f"http://127.0.0.1:{serve_port}"),
            model_name=model_name,
        )


# -- what a run produced (pure) -------------------------------------------------------
@dataclass(frozen=True)
class RunRefs:
    """The MLflow and serving references one DAG run's task results contain."""

    mlflow_run_id: str | None = None
    experiment_id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    deployed: bool = False
    monitor_run_id: str | None = None
    monitor_experiment_id: str | None = None


def _as_mapping(value: Any) -> Mapping | None:
    # XCom values come back as decoded JSON, or as a JSON string from older writers.
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, Mapping) else None


def _scalar(value: Any) -> str | None:
    if value is None or isinstance(value, (bool, dict, list)):
        return None
    text = str(value).strip()
    return text or None


def refs_from_results(results: Iterable[tuple[str, Any]], task_id: str | None = None) -> RunRefs:
    """Collect references from a run's task results.

    ``results``: ``(task_id, return value)`` pairs in the order the tasks pushed
    them (oldest first). For each key the result of ``task_id`` (the task whose
    page is open) wins, then the earliest other task that has the key, so a
    version reported by ``register`` is the one shown even if later tasks
    repeat it.
    """
    pairs = [(t, m) for t, v in results if (m := _as_mapping(v)) is not None]
    ordered = [m for t, m in pairs if t == task_id] + [m for t, m in pairs if t != task_id]

    def first(*keys: str) -> str | None:
        for m in ordered:
            for k in keys:
                if (v := _scalar(m.get(k))) is not None:
                    return v
        return None

    run_id = first("mlflow_run_id")
    # The experiment only from a result about that same MLflow run (evaluate reports both).
    experiment_id = None
    for m in ordered:
        if run_id is not None and _scalar(m.get("mlflow_run_id")) == run_id:
            if (experiment_id := _scalar(m.get("experiment_id"))) is not None:
                break
    return RunRefs(
        mlflow_run_id=run_id,
        experiment_id=experiment_id,
        model_name=first("model_name"),
        model_version=first("version", "model_version"),
        deployed=any(t in DEPLOY_TASKS for t, _ in pairs),
        monitor_run_id=first("monitor_run_id"),
        monitor_experiment_id=first("monitor_experiment_id"),
    )


# -- URLs (pure) ----------------------------------------------------------------------
def mlflow_run_url(cfg: UiConfig, run_id: str, experiment_id: str | None = None) -> str:
    """The MLflow UI page of a run; MLflow's ``#/runs/<id>`` route finds the experiment itself."""
    rid = quote(run_id, safe="")
    if experiment_id:
        return f"{cfg.mlflow_ui}/#/experiments/{quote(experiment_id, safe='')}/runs/{rid}"
    return f"{cfg.mlflow_ui}/#/runs/{rid}"


def model_version_url(cfg: UiConfig, version: str, name: str | None = None) -> str:
    return f"{cfg.mlflow_ui}/#/models/{quote(name or cfg.model_name, safe='')}/versions/{quote(version, safe='')}"


def serving_metadata_url(cfg: UiConfig) -> str:
    return f"{cfg.serve_url}/metadata"


def live_quality_url(cfg: UiConfig, run_id: str, experiment_id: str | None = None) -> str:
    """MLflow's chart of the monitoring run's live Recall@12, one point per week."""
    runs = quote(json.dumps([run_id]), safe="")
    exps = f"&experiments={quote(json.dumps([experiment_id]), safe='')}" if experiment_id else ""
    return f"{cfg.mlflow_ui}/#/metric/{quote(LIVE_METRIC, safe='')}?runs={runs}{exps}"


def links_for(refs: RunRefs, cfg: UiConfig) -> dict[str, str]:
    """Link name -> URL, ``""`` where the run has no such reference (the UI hides empty links)."""
    return {
        MLFLOW_RUN: mlflow_run_url(cfg, refs.mlflow_run_id, refs.experiment_id) if refs.mlflow_run_id else "",
        MODEL_VERSION: model_version_url(cfg, refs.model_version, refs.model_name) if refs.model_version else "",
        SERVING_METADATA: serving_metadata_url(cfg) if refs.deployed else "",
        LIVE_QUALITY: live_quality_url(cfg, refs.monitor_run_id, refs.monitor_experiment_id)
        if refs.monitor_run_id else "",
    }


def external_views(cfg: UiConfig) -> list[dict[str, str]]:
    """The menu entries. No ``url_route``: they open in a new tab instead of an iframe."""
    return [
        {"name": "MLflow", "href": cfg.mlflow_ui, "category": "hm-recsys", "destination": "nav"},
        {"name": "Recommendation service", "href": serving_metadata_url(cfg), "category": "hm-recsys",
         "destination": "nav"},
    ]


# -- the API server side ----------------------------------------------------------------
def read_run_results(dag_id: str, run_id: str) -> list[tuple[str, Any]]:
    """``(task_id, return value)`` for every task of one DAG run, oldest push first.

    Runs in the API server (where extra links are computed), against the
    metadata database. Only ``return_value`` XComs: they carry ids and paths.
    """
    from sqlalchemy import select

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    query = (
        select(XComModel.task_id, XComModel.value)
        .where(XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == "return_value")
        .order_by(XComModel.timestamp, XComModel.task_id)
    )
    with create_session() as session:
        return [(task_id, value) for task_id, value in session.execute(query)]


class _RunLink(BaseOperatorLink):
    """One named link, computed from the task's DAG run (see ``links_for``)."""

    name = ""

    def get_link(self, operator, *, ti_key) -> str:
        refs = refs_from_results(read_run_results(ti_key.dag_id, ti_key.run_id), task_id=ti_key.task_id)
        return links_for(refs, UiConfig.from_env())[self.name]


class MlflowRunLink(_RunLink):
    name = MLFLOW_RUN


class ModelVersionLink(_RunLink):
    name = MODEL_VERSION


class ServingMetadataLink(_RunLink):
    name = SERVING_METADATA


class LiveQualityLink(_RunLink):
    name = LIVE_QUALITY


class HmRecsysPlugin(AirflowPlugin):
    name = "hm_recsys"
    global_operator_extra_links = [MlflowRunLink(), ModelVersionLink(), ServingMetadataLink(), LiveQualityLink()]

    @property
    def external_views(self) -> list[dict[str, str]]:  # type: ignore[override]
        # A property, not a class list: the URLs come from the environment, read when
        # the plugins manager asks (after on_load validated them), never at import.
        return external_views(UiConfig.from_env())

    @classmethod
    def on_load(cls, *args, **kwargs) -> None:
        # Fail loudly at load time (the UI's plugin import errors, every component's
        # log) rather than with a broken link on a task page.
        UiConfig.from_env()
