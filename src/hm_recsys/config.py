"""Typed runtime settings, read from the environment when asked, never at import.

Every process (CLI, Airflow task, BentoML worker, test) calls
``Settings.from_env()`` at the moment it needs a setting, so changing an env var
between runs (or in a test with ``monkeypatch``) is always honoured.

Environment variables (all optional):

``HM_RECSYS_HOME``
    The one runtime folder holding data, MLflow, Airflow and BentoML state.
    Default: ``./var`` under the current directory (the Makefile sets it to the
    repository's ``var/``).
``HM_RECSYS_DATA_ROOT``
    The folder shared by every host that runs tasks (``data/``, ``runs/``,
    ``locks/``; see ``Layout``). Default: the runtime folder itself.
``MLFLOW_TRACKING_URI``
    Any MLflow tracking URI. Default: sqlite database under the runtime folder.
``HM_RECSYS_MLFLOW_ARTIFACTS``
    Artifact root for new MLflow experiments. Default: ``$HM_RECSYS_HOME/mlflow/artifacts``
    with a local (sqlite) store; with a tracking server (``http(s)://``) none,
    so the server's own artifact store is used and artifacts travel over HTTP
    (``mlflow server --serve-artifacts``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hm_recsys.layout import Layout


@dataclass(frozen=True)
class Settings:
    home: Path
    mlflow_tracking_uri: str
    mlflow_artifact_root: Path | None  # None: the tracking server's default (proxied artifacts)
    experiment_name: str = "hm-recsys"
    registered_model_name: str = "hm-recsys-two-tower"
    data_root: Path | None = None

    @property
    def layout(self) -> Layout:
        return Layout(self.home, self.data_root)

    @property
    def remote_tracking(self) -> bool:
        """MLflow is a tracking server reached over HTTP (not a database file on this host)."""
        return self.mlflow_tracking_uri.startswith(("http://", "https://"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("HM_RECSYS_HOME") or Path.cwd() / "var").resolve()
        uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
        artifacts = env.get("HM_RECSYS_MLFLOW_ARTIFACTS")
        if not artifacts and not uri.startswith(("http://", "https://")):
            artifacts = home / "mlflow" / "artifacts"
        data_root = env.get("HM_RECSYS_DATA_ROOT")
        return cls(
            home=home,
            data_root=Path(data_root).resolve() if data_root else None,
            mlflow_tracking_uri=uri,
            mlflow_artifact_root=Path(artifacts) if artifacts else None,
            experiment_name=env.get("HM_RECSYS_EXPERIMENT", cls.experiment_name),
            registered_model_name=env.get("HM_RECSYS_MODEL_NAME", cls.registered_model_name),
        )
