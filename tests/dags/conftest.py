"""Airflow test environment: a private AIRFLOW_HOME with this repo's airflow.cfg."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"


def airflow_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HM_RECSYS_REPO=str(REPO),
        HM_RECSYS_HOME=str(home),
        AIRFLOW_HOME=str(home / "airflow"),
        AIRFLOW_CONFIG=str(REPO / "airflow.cfg"),
        HM_RECSYS_AIRFLOW_PORT="18080",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        AIRFLOW__API_AUTH__JWT_SECRET="test-only-" + "x" * 54,
    )
    return env


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory) -> Path:
    """A migrated Airflow metadata DB in a temp runtime folder; env set for this process too."""
    home = tmp_path_factory.mktemp("af")
    (home / "airflow").mkdir()
    env = airflow_env(home)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    old = dict(os.environ)
    os.environ.update(env)
    yield home
    os.environ.clear()
    os.environ.update(old)
