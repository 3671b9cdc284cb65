"""Settings and Layout: what is shared between hosts, and where MLflow artifacts go."""

from __future__ import annotations

from pathlib import Path

import pytest

from hm_recsys.config import Settings
from hm_recsys.layout import Layout


def test_one_machine_keeps_everything_under_the_runtime_folder(tmp_path):
    s = Settings.from_env({"HM_RECSYS_HOME": str(tmp_path)})
    assert s.data_root is None and s.layout.shared == tmp_path.resolve()
    assert s.layout.warehouse_dir == tmp_path.resolve() / "data" / "warehouse"
    assert s.mlflow_artifact_root == tmp_path.resolve() / "mlflow" / "artifacts"  # local store: a folder
    assert not s.remote_tracking


def test_the_data_root_moves_what_hosts_share_and_nothing_else(tmp_path):
    s = Settings.from_env({"HM_RECSYS_HOME": str(tmp_path / "host"), "HM_RECSYS_DATA_ROOT": str(tmp_path / "nfs")})
    lay, nfs, host = s.layout, (tmp_path / "nfs").resolve(), (tmp_path / "host").resolve()
    for shared in (lay.incoming_dir, lay.warehouse_dir, lay.quarantine_dir, lay.run_dir("r"), lay.locks_dir):
        assert shared.is_relative_to(nfs), shared
    for private in (lay.models_dir, lay.state_dir("3", "2020-09-23"), lay.bentoml_home, lay.mlflow_dir):
        assert private.is_relative_to(host), private


def test_paths_in_xcom_are_relative_to_the_data_root_and_resolve_on_another_mount(tmp_path):
    here = Layout(tmp_path / "a", tmp_path / "mnt-a")
    there = Layout(tmp_path / "b", tmp_path / "mnt-b")
    rel = here.to_shared(here.run_dir("manual__1") / "snapshot")
    assert rel == "runs/manual__1/snapshot"
    assert there.from_shared(rel) == tmp_path / "mnt-b" / "runs" / "manual__1" / "snapshot"
    assert there.from_shared("/abs/path") == Path("/abs/path")  # the CLI may still pass absolute paths
    with pytest.raises(ValueError, match="not under the shared data root"):
        here.to_shared(here.models_dir)  # a host-private path would mean nothing on another worker


def test_a_tracking_server_keeps_its_own_artifact_store(tmp_path):
    s = Settings.from_env({"HM_RECSYS_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert s.remote_tracking and s.mlflow_artifact_root is None  # experiments get the server's proxied store
    explicit = Settings.from_env({"HM_RECSYS_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": "http://mlflow:5000",
                                  "HM_RECSYS_MLFLOW_ARTIFACTS": "/srv/artifacts"})
    assert explicit.mlflow_artifact_root == Path("/srv/artifacts")
