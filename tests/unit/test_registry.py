"""Registry: idempotent registration, aliases, promotion, rollback, concurrent promoters.

Real MLflow (sqlite backend in a temp folder); the "model" is a stub artifact
because only the registry's bookkeeping is under test here.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest

from hm_recsys.config import Settings
from hm_recsys.registry import CHALLENGER, CHAMPION, PREVIOUS, ChampionMoved, Registry, RegistryError


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


def test_promotion_is_compare_and_set_on_the_judged_champion(reg):
    """The gate judged v2 against champion v1; a rollback or another promotion since then wins, loudly."""
    from hm_recsys import pipeline

    v1, v2, v3 = (reg.register(_run(reg.settings)).version for _ in range(3))
    with pytest.raises(ChampionMoved, match="judged version 1 against version 2: it is now none; nothing"):
        reg.promote(v1, expected_champion="2")  # judged against a champion that is gone (rolled back)
    assert reg.get(CHAMPION) is None  # nothing changed
    assert reg.promote(v1, expected_champion=None)[CHAMPION] == "1"
    reg.promote(v3)  # someone else promoted v3 after the gate judged v2 against v1
    with pytest.raises(ChampionMoved, match=r"judged version 2 against version 1: it is now version 3; nothing"):
        reg.promote(v2, expected_champion="1")
    assert reg.aliases() == {CHALLENGER: "3", CHAMPION: "3", PREVIOUS: "1"} and reg.history() == ["1", "3"]
    # the pipeline's promote step fails the task with that reason
    with pytest.raises(pipeline.PipelineError, match="the champion moved"):
        pipeline.promote({"version": v2, "promote": True, "champion_version": "1"}, reg.settings)
    assert reg.promote(v2, expected_champion="3")[CHAMPION] == "2"  # judged against the current one: fine
    assert reg.promote(v2, expected_champion="3")[CHAMPION] == "2"  # a retry of a done promotion is a no-op


def test_served_states_only_move_forward(reg, tmp_path):
    """publish_state: an older as_of is stored but never replaces the newer served_as_of."""
    import json

    from hm_recsys.fsutil import file_sha256

    import mlflow

    run = _run(reg.settings)
    mlflow.MlflowClient(reg.settings.mlflow_tracking_uri).log_text(run, "stub", "bundle/config.json")
    v = reg.register(run).version

    def state(as_of: str):
        d = tmp_path / as_of
        d.mkdir()
        (d / "x.npy").write_bytes(as_of.encode())
        (d / "manifest.json").write_text(json.dumps({"format_version": 1, "model_version": v, "as_of": as_of,
                                                      "files": {"x.npy": file_sha256(d / "x.npy")}}))
        return d

    assert reg.served_as_of(v) is None
    assert reg.publish_state(v, state("2020-09-16"))["current"] is True
    out = reg.publish_state(v, state("2020-09-23"))
    assert out["current"] is True and reg.served_as_of(v) == "2020-09-23"
    out = reg.publish_state(v, state("2020-09-09"))
    assert out["current"] is False and out["served_as_of"] == "2020-09-23" == reg.served_as_of(v)
    assert reg.served_states(v) == ["2020-09-09", "2020-09-16", "2020-09-23"]
    files = reg.fetch_state(v, "2020-09-16")  # downloaded from the run, verified
    assert (files.state_dir / "x.npy").read_bytes() == b"2020-09-16" and files.as_of.isoformat() == "2020-09-16"
    assert reg.fetch_state(v).state_dir.name == "2020-09-23"  # default: the newest


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
