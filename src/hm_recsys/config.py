"""Typed runtime settings, read from the environment when asked, never at import.

Every process (CLI, Airflow task, BentoML worker, test) calls
``Settings.from_env()`` at the moment it needs a setting, so changing an env var
between runs (or in a test with ``monkeypatch``) is always honoured.

Environment variables (all optional):

``HM_RECSYS_HOME``
    The one runtime folder holding data, MLflow, Airflow and BentoML state.
    Default: ``./var`` under the current directory (the Makefile sets it to the
    repository's ``var/``).
``MLFLOW_TRACKING_URI``
    Any MLflow tracking URI. Default: sqlite database under the runtime folder.
``HM_RECSYS_MLFLOW_ARTIFACTS``
    Artifact root for new MLflow experiments. Default: ``$HM_RECSYS_HOME/mlflow/artifacts``.
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
    mlflow_artifact_root: Path
    experiment_name: str = "hm-recsys"
    registered_model_name: str = "hm-recsys-two-tower"

    @property
    def layout(self) -> Layout:
        return Layout(self.home)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("HM_RECSYS_HOME") or Path.cwd() / "var").resolve()
        artifacts = Path(env.get("HM_RECSYS_MLFLOW_ARTIFACTS") or home / "mlflow" / "artifacts")
        uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
        return cls(
            home=home,
            mlflow_tracking_uri=uri,
            mlflow_artifact_root=artifacts,
            experiment_name=env.get("HM_RECSYS_EXPERIMENT", cls.experiment_name),
            registered_model_name=env.get("HM_RECSYS_MODEL_NAME", cls.registered_model_name),
        )
