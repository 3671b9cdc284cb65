"""Registry: idempotent registration, aliases, promotion, rollback, concurrent promoters.

Real MLflow (sqlite backend in a temp folder); the "model" is a stub artifact
because only the registry's bookkeeping is under test here.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest

from hm_recsys.config import Settings
from hm_recsys.registry import CHALLENGER, CHAMPION, PREVIOUS, Registry, RegistryError


def _run(settings: Settings) -> str:
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    exp = mlflow.get_experiment_by_name("t")
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(
        "t", artifact_location=settings.mlflow_artifact_root.as_uri()
    )
    with mlflow.start_run(experiment_id=exp_id) as r:
        mlflow.log_text("stub", "model/MLmodel")
    return r.info.run_id


@pytest.fixture
def reg(home) -> Registry:
    return Registry(Settings.from_env())


def test_register_is_idempotent_on_key(reg):
    run = _run(reg.settings)
    v1 = reg.register(run, idempotency_key="airflow-run-1", tags={"data_window": "w"})
    v2 = reg.register(run, idempotency_key="airflow-run-1")
    assert v1.version == v2.version == "1"
    assert v1.tags["data_window"] == "w" and v1.tags["idempotency_key"] == "airflow-run-1"
    v3 = reg.register(_run(reg.settings), idempotency_key="airflow-run-2")
    assert v3.version == "2"
    assert reg.get(CHALLENGER).version == "2"


def test_promote_moves_aliases_and_is_idempotent(reg):
    versions = [reg.register(_run(reg.settings)).version for _ in range(3)]
    assert reg.get(CHAMPION) is None
    assert reg.promote(versions[0]) == {CHALLENGER: "3", CHAMPION: "1"}
    assert reg.promote(versions[1]) == {CHALLENGER: "3", CHAMPION: "2", PREVIOUS: "1"}
    assert reg.promote(versions[1]) == {CHALLENGER: "3", CHAMPION: "2", PREVIOUS: "1"}
    assert reg.history() == ["1", "2"]


def test_rollback_restores_previous(reg):
    for _ in range(3):
        reg.promote(reg.register(_run(reg.settings)).version)
    assert reg.aliases()[CHAMPION] == "3"
    assert reg.rollback() == {CHALLENGER: "3", CHAMPION: "2", PREVIOUS: "1"}
    assert reg.version("3").tags["rolled_back"] == "true"
    assert reg.rollback() == {CHALLENGER: "3", CHAMPION: "1"}
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback()


def test_promote_unknown_version_fails(reg):
    reg.register(_run(reg.settings))
    with pytest.raises(Exception, match="not found|RESOURCE_DOES_NOT_EXIST|does not exist"):
        reg.promote("42")
    assert reg.get(CHAMPION) is None


def _promote_worker(home: str, version: str, barrier) -> None:
    import os

    os.environ["HM_RECSYS_HOME"] = home
    r = Registry(Settings.from_env())
    barrier.wait()
    r.promote(version)


def test_concurrent_promoters_leave_consistent_aliases(reg, home):
    versions = [reg.register(_run(reg.settings)).version for _ in range(6)]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(versions))
    procs = [ctx.Process(target=_promote_worker, args=(str(home), v, barrier)) for v in versions]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    history = reg.history()
    aliases = reg.aliases()
    # every promotion happened exactly once, in some serial order...
    assert sorted(history, key=int) == versions
    # ...and the aliases agree with the last two of that order
    assert aliases[CHAMPION] == history[-1] and aliases[PREVIOUS] == history[-2]
