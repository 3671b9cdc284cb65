"""Shared fixtures: a private runtime folder per test and tiny seeded datasets.

Nothing here touches $HOME or the network. The tiny dataset is generated once
per session (seconds) and ingested once; tests that mutate a warehouse copy it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Telemetry off for every library, before any of them is imported by a test.
for _k, _v in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(_k, _v)

TINY_SEED = 7


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh HM_RECSYS_HOME for one test; Settings.from_env() points into it."""
    h = tmp_path / "var"
    h.mkdir()
    monkeypatch.setenv("HM_RECSYS_HOME", str(h))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return h


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> Path:
    """The three H&M CSVs (+ oracle/) at `tiny` scale, generated once per session."""
    from hm_recsys.data.synthetic import generate

    out = tmp_path_factory.mktemp("tiny_raw")
    generate(out, scale="tiny", seed=TINY_SEED, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_warehouse_ro(tiny_raw, tmp_path_factory) -> Path:
    """The tiny dataset ingested into a warehouse. Read-only: copy it before mutating."""
    from hm_recsys.data.ingest import ingest_history

    wh = tmp_path_factory.mktemp("tiny_wh") / "warehouse"
    ingest_history(tiny_raw, wh, progress=False)
    return wh


@pytest.fixture
def tiny_warehouse(tiny_warehouse_ro, tmp_path) -> Path:
    """A private, writable copy of the tiny warehouse."""
    dst = tmp_path / "warehouse"
    shutil.copytree(tiny_warehouse_ro, dst)
    return dst
