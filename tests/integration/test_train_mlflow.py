"""A real training run on tiny data: MLflow run contents, the bundle, and the pyfunc round trip."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tiny_warehouse_ro, tmp_path_factory):
    """One run of ``run_training`` against a private sqlite MLflow (module-scoped: it takes ~20 s)."""
    from hm_recsys.config import Settings
    from tests.unit.test_train import tiny_config

    from hm_recsys import train as T

    home = tmp_path_factory.mktemp("home") / "var"
    settings = Settings.from_env({"HM_RECSYS_HOME": str(home)})
    result = T.run_training(settings, tiny_config(epochs=2), run_name="tiny", tags={"purpose": "test"},
                            progress=False, warehouse=tiny_warehouse_ro)
    return settings, result


def test_run_is_logged_with_params_metrics_and_artifacts(trained):
    import mlflow

    settings, result = trained
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["purpose"] == "test"
    assert run.info.run_name == "tiny"
    p = run.data.params
    assert p["config.train.temperature"] == "0.1" and p["config.train.batch_size"] == "256"
    assert p["split.holdout_start"] == result.split.holdout_start.isoformat()
    assert len(p["data.data_sha256"]) == 64 and run.data.tags["data_sha256"] == p["data.data_sha256"]
    m = run.data.metrics
    for key in ("recall_at_12", "recall_at_100", "map_at_12", "two-tower.recall_at_12", "popularity.recall_at_12",
                "repurchase_popularity.recall_at_12", "trending_decayed-repurchase.recall_at_12",
                "oracle.recall_at_12", "fraction_of_oracle.recall_at_12", "lift_vs_best_baseline.recall_at_12",
                "valid_recall_at_12", "train_loss", "examples_per_second", "seconds.fusion"):
        assert key in m, key
    # the bare metrics are the served model's: every candidate source, fused
    assert m["recall_at_12"] == pytest.approx(result.metrics["served"]["recall@12"])
    assert m["two-tower.recall_at_12"] == pytest.approx(result.metrics["two-tower"]["recall@12"])
    assert run.data.tags["best_baseline"] in ("popularity", "repurchase+popularity", "trending+decayed-repurchase")
    # the fusion travels with the run: weights as params, the fitted file as an artifact
    assert {f"fusion.weight.{f}" for f in ("two_tower", "repurchase", "trending")} <= set(p)
    assert p["config.retrieval.sold_within_weeks"] == "4"
    assert len(client.get_metric_history(result.run_id, "valid_recall_at_12")) == 2  # one per epoch
    arts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"plots", "metrics_table.txt", "data_window.json", "fusion.json"} <= arts
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert plots == {"plots/loss.png", "plots/recall_at_k.png", "plots/valid_recall.png"}
    assert "served" in result.table and "two-tower" in result.table and "oracle" in result.table
    assert "trending+decayed-repurchase" in result.table


def T_config():
    from tests.unit.test_train import tiny_config

    return tiny_config(epochs=2)


def test_bundle_is_self_describing(trained):
    from hm_recsys import bundle

    settings, result = trained
    assert result.bundle_dir == settings.layout.bundle_dir(result.run_id)
    doc = bundle.read_config(result.bundle_dir)
    assert doc["model"]["customer"][0]["cardinality"] > 1  # model args carry the fitted sizes
    assert doc["history_as_of"] == result.split.holdout_start.isoformat()
    window = json.loads((result.bundle_dir / "data_window.json").read_text())
    assert window["split"] == result.split.to_dict()
    metrics = json.loads((result.bundle_dir / "metrics.json").read_text())
    assert metrics["holdout"]["served"]["recall@12"] == pytest.approx(result.metrics["served"]["recall@12"])
    config, fusion = bundle.retrieval(result.bundle_dir)  # what a served state of this bundle uses
    assert config == T_config().retrieval and fusion.fitted["weeks"] == [w.isoformat() for w in result.split.valid_week_starts()]
    assert metrics["fusion"] == fusion.to_dict()
    assert not list(result.bundle_dir.rglob("*.pkl")) and not list(result.bundle_dir.rglob("*.pickle"))
    assert not settings.layout.train_scratch_dir(result.run_id).exists()  # shards are cleaned up


def test_pyfunc_round_trip_gives_identical_scores(trained):
    import mlflow

    from hm_recsys import bundle

    settings, result = trained
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    rec = bundle.load(result.bundle_dir)
    known = rec.known_customer_ids()[:5]
    ids = [*known, "f" * 64]  # the last one is unknown to the model
    direct = rec.recommend(ids, k=12)
    for uri in (result.model_uri, f"runs:/{result.run_id}/model"):
        model = mlflow.pyfunc.load_model(uri)
        out = model.predict(pd.DataFrame({"customer_id": ids}), params={"k": 12})
        assert out["customer_id"].tolist() == ids
        for row, want in zip(out.itertuples(), direct):
            assert list(row.article_ids) == [a for a, _ in want]
            assert np.array_equal(np.asarray(row.scores, dtype=np.float32), np.float32([s for _, s in want]))
    # the features path: an unknown customer described by a few fields and recent articles
    feats = pd.DataFrame({"customer_id": ["f" * 64], "age": [24.0], "club_member_status": ["ACTIVE"],
                          "recent_articles": [[rec.article_ids[0], rec.article_ids[1]]]})
    out = model.predict(feats, params={"k": 5, "exclude_purchased": True})
    assert len(out["article_ids"][0]) == 5
    want = rec.recommend(["f" * 64], k=5, features=feats.drop(columns="customer_id"))[0]
    assert list(out["article_ids"][0]) == [a for a, _ in want]
    assert model.metadata.get_input_schema().input_names()[0] == "customer_id"
