"""The Airflow UI plugin: it loads cleanly and cheaply, and its links point where a run's XComs say.

Unit level: the pure functions of ``plugins/hm_recsys_plugin.py`` on the result
shapes the retrain DAG's tasks return. Airflow level: the plugins manager loads
it (or reports a clear import error for a bad URL). Integration: a real DAG run
through ``dag.test()`` and Airflow's own extra-links API endpoint.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

from .conftest import REPO, airflow_env

PLUGIN = REPO / "plugins" / "hm_recsys_plugin.py"
HEAVY = ["torch", "scann", "bentoml", "mlflow", "great_expectations", "pandas", "numpy", "fastapi", "hm_recsys"]


@pytest.fixture(scope="module")
def plugin():
    spec = importlib.util.spec_from_file_location("hm_recsys_plugin_under_test", PLUGIN)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture
def cfg(plugin):
    return plugin.UiConfig(mlflow_ui="http://mlflow.test:5000", serve_url="http://serve.test:3000",
                           model_name="hm-recsys-two-tower")


# What the retrain DAG's tasks return (hm_recsys.pipeline), oldest push first.
_SPLIT = {"train_start": "2020-06-03", "valid_start": "2020-09-02", "holdout_start": "2020-09-09"}
_TRAINED = {"mlflow_run_id": "0f3c9a51", "bundle_dir": "/var/lib/hm-recsys/bundles/0f3c9a51",
            "model_uri": "models:/m-1", "split": _SPLIT, "warehouse": "/var/runs/r/snapshot", "data_hash": "ab"}
RETRAIN_RESULTS = [
    ("validate_incoming", [{"drop": "transactions_2020-09-09.csv", "status": "accepted"}]),
    ("check_data", {"split": _SPLIT, "warehouse": "/var/lib/hm-recsys/data/warehouse"}),
    ("build_snapshot", {"split": _SPLIT, "warehouse": "/var/runs/r/snapshot", "data_hash": "ab", "files": 14}),
    ("train", _TRAINED),
    ("register", {**_TRAINED, "version": "3"}),
    ("build_index", {**_TRAINED, "version": "3", "index_dir": "/var/runs/r/index", "index_recall": 0.99}),
    ("evaluate", {"version": "3", "promote": True, "reason": "lift 4.1% > 2%", "champion_version": "2",
                  "challenger_recall": 0.11, "mlflow_run_id": "0f3c9a51", "experiment_id": "7", "table": "..."}),
    ("gate", "promote"),
    ("promote", {"version": "3", "aliases": {"champion": "3", "previous-champion": "2"}}),
    ("deploy", {"version": "3", "model": "hm-recsys-two-tower:v3", "bento": "hm_recsys:v3", "built": True,
                "service": {"url": "http://127.0.0.1:3000", "status": "switched"}}),
    ("report", {"version": "3", "promote": True, "reason": "lift 4.1% > 2%"}),
]


# -- configuration ------------------------------------------------------------------------
def test_config_defaults_follow_the_local_stack_ports(plugin):
    assert plugin.UiConfig.from_env({}) == plugin.UiConfig(
        "http://127.0.0.1:5000", "http://127.0.0.1:3000", "hm-recsys-two-tower")
    env = {"HM_RECSYS_MLFLOW_PORT": "5001", "HM_RECSYS_SERVE_PORT": "3001", "HM_RECSYS_MODEL_NAME": "m"}
    assert plugin.UiConfig.from_env(env) == plugin.UiConfig("http://127.0.0.1:5001", "http://127.0.0.1:3001", "m")


def test_config_explicit_urls_win_and_lose_their_trailing_slash(plugin):
    env = {"HM_RECSYS_MLFLOW_UI": " https://mlflow.corp.example/ ", "HM_RECSYS_SERVE_URL": "http://127.0.0.1:3000/",
           "HM_RECSYS_MLFLOW_PORT": "9999"}
    cfg = plugin.UiConfig.from_env(env)
    assert (cfg.mlflow_ui, cfg.serve_url) == ("https://mlflow.corp.example", "http://127.0.0.1:3000")


@pytest.mark.parametrize("var", ["HM_RECSYS_MLFLOW_UI", "HM_RECSYS_SERVE_URL"])
@pytest.mark.parametrize("bad", ["mlflow:5000", "ftp://host/x", "javascript:alert(1)", "http://"])
def test_config_rejects_what_a_browser_cannot_open(plugin, var, bad):
    with pytest.raises(ValueError, match=f"^{var} must be an http"):
        plugin.UiConfig.from_env({var: bad})


# -- links from a run's results --------------------------------------------------------------
@pytest.mark.parametrize("task_id", [t for t, _ in RETRAIN_RESULTS])
def test_every_task_of_a_deployed_retrain_run_links_to_its_run_version_and_service(plugin, cfg, task_id):
    refs = plugin.refs_from_results(RETRAIN_RESULTS, task_id=task_id)
    assert plugin.links_for(refs, cfg) == {
        "MLflow run": "http://mlflow.test:5000/#/experiments/7/runs/0f3c9a51",
        "Model version": "http://mlflow.test:5000/#/models/hm-recsys-two-tower/versions/3",
        "Serving metadata": "http://serve.test:3000/metadata",
        "Live quality": "",
    }


REFRESH_RESULTS = [
    ("live_quality", {"status": "scored", "version": "3", "monitor_run_id": "9a1e", "monitor_experiment_id": "7",
                      "weeks": [{"week": "2020-09-16", "served_recall_at_12": 0.18}]}),
    ("refresh_state", {"version": "3", "as_of": "2020-09-23", "status": "built"}),
    ("switch_service", {"url": "http://127.0.0.1:3000", "status": "switched", "model_version": "3"}),
]


@pytest.mark.parametrize("task_id", [t for t, _ in REFRESH_RESULTS])
def test_a_refresh_run_links_to_the_live_quality_chart_and_the_service(plugin, cfg, task_id):
    links = plugin.links_for(plugin.refs_from_results(REFRESH_RESULTS, task_id=task_id), cfg)
    assert links == {
        "MLflow run": "",
        "Model version": "http://mlflow.test:5000/#/models/hm-recsys-two-tower/versions/3",
        "Serving metadata": "http://serve.test:3000/metadata",
        "Live quality": "http://mlflow.test:5000/#/metric/live.recall_at_12?runs=%5B%229a1e%22%5D"
                        "&experiments=%5B%227%22%5D",
    }
    # before the swap succeeded (no switch_service result yet), no serving link
    early = plugin.links_for(plugin.refs_from_results(REFRESH_RESULTS[:2], task_id=task_id), cfg)
    assert early["Serving metadata"] == "" and early["Live quality"].endswith("%5B%227%22%5D")


def test_run_stopped_before_deploy_has_no_serving_link(plugin, cfg):
    kept = RETRAIN_RESULTS[:8] + [("keep_champion", {"version": "3", "promoted": False, "reason": "no lift"})]
    links = plugin.links_for(plugin.refs_from_results(kept, task_id="keep_champion"), cfg)
    assert links["Serving metadata"] == ""
    assert links["Model version"] == "http://mlflow.test:5000/#/models/hm-recsys-two-tower/versions/3"


def test_run_failed_before_evaluate_links_the_run_by_id_alone(plugin, cfg):
    links = plugin.links_for(plugin.refs_from_results(RETRAIN_RESULTS[:6], task_id="build_index"), cfg)
    assert links == {"MLflow run": "http://mlflow.test:5000/#/runs/0f3c9a51",
                     "Model version": "http://mlflow.test:5000/#/models/hm-recsys-two-tower/versions/3",
                     "Serving metadata": "", "Live quality": ""}


def test_experiment_is_taken_only_from_a_result_about_the_same_run(plugin):
    results = [("train", {"mlflow_run_id": "aaa"}), ("other", {"mlflow_run_id": "bbb", "experiment_id": "9"})]
    assert plugin.refs_from_results(results, task_id="train").experiment_id is None
    assert plugin.refs_from_results(results, task_id="other") == plugin.RunRefs(mlflow_run_id="bbb",
                                                                                 experiment_id="9")


def test_run_failed_in_training_has_no_links(plugin, cfg):
    refs = plugin.refs_from_results(RETRAIN_RESULTS[:3], task_id="train")
    assert refs == plugin.RunRefs()
    assert plugin.links_for(refs, cfg) == {"MLflow run": "", "Model version": "", "Serving metadata": "",
                                           "Live quality": ""}


def test_ingest_run_results_are_ignored(plugin, cfg):
    results = [("process_drops", [{"drop": "transactions_2020-09-23.csv", "status": "accepted"}]),
               ("any_accepted", True), ("publish", ["transactions_2020-09-23.csv"]), ("fail_on_rejects", None)]
    assert plugin.links_for(plugin.refs_from_results(results, task_id="publish"), cfg) == {
        "MLflow run": "", "Model version": "", "Serving metadata": "", "Live quality": ""}


def test_the_open_task_wins_then_the_earliest_producer(plugin):
    results = [("register", {"version": "3"}), ("promote", {"version": "4"}), ("report", {"version": "5"})]
    assert plugin.refs_from_results(results, task_id="promote").model_version == "4"
    assert plugin.refs_from_results(results, task_id="gate").model_version == "3"
    assert plugin.refs_from_results(results).model_version == "3"


def test_values_stored_as_json_text_are_read_and_non_scalars_skipped(plugin):
    results = [("train", json.dumps({"mlflow_run_id": "abc", "experiment_id": ""})),
               ("register", {"version": {"nested": 1}}), ("promote", {"version": 4}),
               ("broken", "{not json")]
    refs = plugin.refs_from_results(results)
    assert (refs.mlflow_run_id, refs.experiment_id, refs.model_version) == ("abc", None, "4")


def test_run_without_experiment_uses_mlflows_direct_run_route(plugin, cfg):
    refs = plugin.refs_from_results([("train", {"mlflow_run_id": "abc"})])
    assert plugin.links_for(refs, cfg)["MLflow run"] == "http://mlflow.test:5000/#/runs/abc"


def test_a_model_name_in_the_results_beats_the_configured_one(plugin, cfg):
    refs = plugin.refs_from_results([("register", {"version": "3", "model_name": "hm-other"})])
    assert plugin.links_for(refs, cfg)["Model version"] == "http://mlflow.test:5000/#/models/hm-other/versions/3"


def test_url_parts_are_quoted(plugin, cfg):
    assert plugin.model_version_url(cfg, "3", "team a/model") == (
        "http://mlflow.test:5000/#/models/team%20a%2Fmodel/versions/3")
    assert plugin.mlflow_run_url(cfg, "a/b", "1 2") == "http://mlflow.test:5000/#/experiments/1%202/runs/a%2Fb"


def test_menu_entries(plugin, cfg):
    assert plugin.external_views(cfg) == [
        {"name": "MLflow", "href": "http://mlflow.test:5000", "category": "hm-recsys", "destination": "nav"},
        {"name": "Recommendation service", "href": "http://serve.test:3000/metadata", "category": "hm-recsys",
         "destination": "nav"},
    ]


# -- inside Airflow ----------------------------------------------------------------------------
_LOAD_PROBE = """
import json
from airflow import plugins_manager as pm
plugins, errors = pm._get_plugins()
info = pm.get_plugin_info() if plugins else []
print(json.dumps({"names": [p.name for p in plugins], "errors": errors, "info": info}, default=str))
"""


def _load_plugins(tmp_path, **extra_env) -> dict:
    env = airflow_env(tmp_path)
    for k in ("HM_RECSYS_MLFLOW_UI", "HM_RECSYS_SERVE_URL", "HM_RECSYS_MLFLOW_PORT", "HM_RECSYS_SERVE_PORT",
              "HM_RECSYS_MODEL_NAME"):
        env.pop(k, None)
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", _LOAD_PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plugins_manager_loads_the_plugin(tmp_path):
    got = _load_plugins(tmp_path, HM_RECSYS_MLFLOW_UI="http://127.0.0.1:15000", HM_RECSYS_SERVE_PORT="13000")
    assert got["names"] == ["hm_recsys"] and got["errors"] == {}
    (info,) = got["info"]
    assert info["source"] == "$PLUGINS_FOLDER/hm_recsys_plugin.py"
    assert info["global_operator_extra_links"] == [
        "<hm_recsys_plugin.MlflowRunLink object>",
        "<hm_recsys_plugin.ModelVersionLink object>",
        "<hm_recsys_plugin.ServingMetadataLink object>",
        "<hm_recsys_plugin.LiveQualityLink object>",
    ]
    assert info["external_views"] == [
        {"name": "MLflow", "href": "http://127.0.0.1:15000", "category": "hm-recsys", "destination": "nav"},
        {"name": "Recommendation service", "href": "http://127.0.0.1:13000/metadata", "category": "hm-recsys",
         "destination": "nav"},
    ]


def test_a_bad_url_is_a_plugin_import_error_naming_the_variable(tmp_path):
    got = _load_plugins(tmp_path, HM_RECSYS_SERVE_URL="serve:3000")
    assert got["names"] == []
    assert list(got["errors"].values()) == [
        "HM_RECSYS_SERVE_URL must be an http(s):// URL that a browser can open, got 'serve:3000'"]


def test_plugin_import_adds_no_heavy_library(tmp_path):
    """Every Airflow component loads plugins: importing this one must not pull MLflow, torch or FastAPI."""
    probe = f"""
import json, runpy, sys
import airflow.plugins_manager, airflow.sdk  # Airflow's own cost is not the plugin's
before = set(sys.modules)
runpy.run_path({str(PLUGIN)!r})
added = set(sys.modules) - before
print(json.dumps(sorted(m for m in added if m.split('.')[0] in {HEAVY!r})))
"""
    out = subprocess.run([sys.executable, "-c", probe], env=airflow_env(tmp_path), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


_RUN_PROBE = '''
import datetime as dt, json
from airflow.sdk import dag, task

@dag(dag_id="hm_plugin_probe", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
def probe():
    @task
    def train():
        return {"mlflow_run_id": "0f3c9a51", "experiment_id": "7"}

    @task
    def register(trained):
        return {"version": "3"}

    @task
    def deploy(registered):
        return {"version": registered["version"]}

    @task
    def live_quality(deployed):
        return {"monitor_run_id": "5b2c", "monitor_experiment_id": "7"}

    live_quality(deploy(register(train())))

the_dag = probe()

if __name__ == "__main__":
    from fastapi.testclient import TestClient
    from airflow.api_fastapi.app import create_app

    run = the_dag.test()
    client = TestClient(create_app())
    base = f"/api/v2/dags/hm_plugin_probe/dagRuns/{run.run_id}/taskInstances"
    print(json.dumps({
        "state": str(run.state),
        "plugins": [p["name"] for p in client.get("/api/v2/plugins").json()["plugins"]],
        "links": {t: client.get(f"{base}/{t}/links").json()["extra_links"]
                  for t in ("train", "register", "deploy", "live_quality")},
    }))
'''


@pytest.mark.integration
@pytest.mark.slow
def test_a_real_run_shows_the_links_through_airflows_api(airflow_home, tmp_path):
    """dag.test() stores real XComs; Airflow's extra-links endpoint (what the UI calls) returns our URLs."""
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "hm_plugin_probe.py").write_text(textwrap.dedent(_RUN_PROBE))
    env = airflow_env(airflow_home)
    env.update(
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        # The endpoint's auth is Airflow's own; this test is about what it returns.
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
        HM_RECSYS_MLFLOW_UI="http://mlflow.test:5000",
        HM_RECSYS_SERVE_URL="http://serve.test:3000",
        HM_RECSYS_MODEL_NAME="hm-recsys-two-tower",
    )
    out = subprocess.run([sys.executable, str(dags / "hm_plugin_probe.py")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["state"] == "success" and got["plugins"] == ["hm_recsys"]
    expected = {
        "MLflow run": "http://mlflow.test:5000/#/experiments/7/runs/0f3c9a51",
        "Model version": "http://mlflow.test:5000/#/models/hm-recsys-two-tower/versions/3",
        "Serving metadata": "http://serve.test:3000/metadata",
        "Live quality": "http://mlflow.test:5000/#/metric/live.recall_at_12?runs=%5B%225b2c%22%5D"
                        "&experiments=%5B%227%22%5D",
    }
    assert got["links"] == {t: expected for t in ("train", "register", "deploy", "live_quality")}
