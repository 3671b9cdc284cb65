"""Training: the corrected in-batch softmax, masking, the typed config, batches, a tiny end-to-end fit."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hm_recsys import train as T
from hm_recsys.training import dataset
from hm_recsys.features import FeatureConfig
from hm_recsys.model import ModelConfig

REPO = Path(__file__).resolve().parents[2]


# -- the loss -----------------------------------------------------------------
def test_logq_correction_lowers_popular_articles_logits_by_log_q():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[0.6, 0.8], [0.6, 0.8]])  # two identical candidates...
    log_q = torch.log(torch.tensor([8.0, 1.0]))  # ...the first sampled 8x more often
    raw = T.corrected_logits(q, c, None, temperature=0.5)
    fixed = T.corrected_logits(q, c, log_q, temperature=0.5)
    assert torch.allclose(raw, torch.tensor([[1.2, 1.2], [1.6, 1.6]]))
    assert torch.allclose(fixed, raw - log_q)
    assert (fixed[:, 0] < fixed[:, 1]).all()  # the popular one now scores lower
    assert float(fixed[0, 1] - fixed[0, 0]) == pytest.approx(math.log(8.0))


def test_logq_correction_raises_the_loss_weight_of_unpopular_negatives():
    """With the correction, a frequently sampled negative counts less in the denominator."""
    q = torch.tensor([[1.0, 0.0]])
    cands = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    ids = torch.tensor([0, 1, 2])
    popular = T.in_batch_softmax_loss(q, cands, ids, torch.log(torch.tensor([1.0, 10.0, 1.0])), 1.0)
    flat = T.in_batch_softmax_loss(q, cands, ids, torch.zeros(3), 1.0)
    # loss = -log(e^1 / (e^1 + e^{0 - log 10} + e^0))
    assert float(popular) == pytest.approx(-math.log(math.e / (math.e + 0.1 + 1.0)), rel=1e-6)
    assert float(flat) == pytest.approx(-math.log(math.e / (math.e + 2.0)), rel=1e-6)
    assert popular < flat


def test_accidental_hits_are_masked_hand_computed():
    # rows 0 and 1 both bought article 7; candidate 2 is an extra negative (article 9)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cands = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    ids = torch.tensor([7, 7, 9])
    loss = T.in_batch_softmax_loss(q, cands, ids, None, temperature=1.0)
    # row 0: positive 1.0; candidate 1 is also article 7 -> masked; negative 0.6
    # row 1: positive 1.0; candidate 0 masked; negative 0.8
    want = 0.5 * (-math.log(math.e / (math.e + math.exp(0.6))) - math.log(math.e / (math.e + math.exp(0.8))))
    assert float(loss) == pytest.approx(want, rel=1e-6)
    unmasked = T.in_batch_softmax_loss(q, cands, ids, None, temperature=1.0, mask_accidental_hits=False)
    want_unmasked = 0.5 * (-math.log(math.e / (math.e + 1.0 + math.exp(0.6)))
                           - math.log(math.e / (math.e + 1.0 + math.exp(0.8))))
    assert float(unmasked) == pytest.approx(want_unmasked, rel=1e-6)


def test_same_customer_purchases_are_masked():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    cands = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    ids = torch.tensor([1, 2, 3])
    customers = torch.tensor([5, 5, 6])
    loss = T.in_batch_softmax_loss(q, cands, ids, None, 1.0, query_ids=customers)
    # row 0: candidate 1 is customer 5's other purchase -> masked; row 1 likewise masks candidate 0
    r0 = -math.log(math.e / (math.e + 1.0))
    r1 = -math.log(1.0 / (1.0 + 1.0))
    r2 = -math.log(math.e / (1.0 + math.e + math.e))  # row 2 scores 0, 1, 1: nothing masked
    assert float(loss) == pytest.approx((r0 + r1 + r2) / 3, rel=1e-6)


def test_equal_pairs_exact():
    rows, cols = T.equal_pairs(torch.tensor([3, 5, 3]), torch.tensor([3, 5, 3, 3, 8]))
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 2), (0, 3), (2, 0), (2, 3)]


def test_dedupe_keeps_first_of_each_pair():
    keep = dataset._dedupe(np.array([0, 1, 0, 0, 1]), np.array([4, 4, 4, 5, 4]))
    assert keep.tolist() == [0, 1, 3]


# -- config ---------------------------------------------------------------------
def test_shipped_toml_documents_the_defaults():
    assert T.load_config(REPO / "configs" / "two_tower.toml") == T.Config()


def test_overrides_are_typed():
    cfg = T.load_config(None, ["train.temperature=0.1", "model.customer_layers=[128, 64]",
                               "features.history=['article_id']", "model.embedding_dims.article_id=48",
                               "train.early_stopping_metric=recall@100"])
    assert cfg.train.temperature == 0.1
    assert cfg.model.customer_layers == (128, 64)
    assert cfg.features.history == ("article_id",)
    assert cfg.model.dim_of("article_id") == 48
    assert cfg.train.early_stopping_metric == "recall@100"  # a bare string is accepted
    back = T.Config.from_dict(cfg.to_dict())
    assert back == cfg


@pytest.mark.parametrize("override, message", [
    ("train.epochs=two", "option 'epochs' must be int"),
    ("train.epoch=2", "unknown option 'epoch'"),
    ("trian.epochs=2", r"unknown section\(s\) \['trian'\]"),
    ("train.temperature=0", "temperature must be > 0"),
    ("train.use_gpu=true", "unknown option 'use_gpu'"),
    ("model.customer=['age']", r"set from \[features\]"),
    ("epochs=2", "must name a section"),
])
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        T.load_config(None, [override])


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        T.load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        T.load_config(bad)


# -- data and a tiny fit ----------------------------------------------------------
def tiny_config(**train) -> T.Config:
    """A small model that trains on the tiny warehouse in a couple of seconds."""
    return T.Config(
        features=FeatureConfig(history_weeks=8, history_length=8, postal_buckets=64),
        model=ModelConfig(embedding_dim=8, embedding_dims={"article_id": 16, "customer_id": 8},
                          customer_layers=(32,), article_layers=(32,), output_dim=16),
        train=T.TrainConfig(**{"train_weeks": 8, "epochs": 4, "batch_size": 256, "uniform_negatives": 64,
                               "temperature": 0.1, "lr": 0.005, "sparse_lr": 0.02, "patience": 4,
                               "valid_max_customers": 0, "threads": 1, **train}),
    )


@pytest.fixture(scope="module")
def tiny_prep(tiny_warehouse_ro, tmp_path_factory):
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.split import Split

    wh = Warehouse(tiny_warehouse_ro)
    cfg = tiny_config()
    split = Split.from_warehouse(wh, train_weeks=cfg.train.train_weeks)
    prep = T.prepare(wh, split, cfg, tmp_path_factory.mktemp("shards"), progress=False)
    return wh, split, cfg, prep


def test_prepare_writes_one_shard_per_training_week_without_future_rows(tiny_prep):
    wh, split, cfg, prep = tiny_prep
    assert len(prep.shards) == split.train_weeks
    total = 0
    for path in prep.shards:
        cust, art, hist, raw = dataset._load_shard(path)
        week = hist.as_of
        assert split.train_start <= week < split.train_end and raw.as_of == week
        # history days are all strictly before the week: days_ago >= 1
        assert (hist.days_ago >= 1).all()
        # deduped (customer, article) pairs
        assert np.unique(cust * 10**6 + art).size == cust.size
        total += cust.size
    assert total == prep.n_examples
    assert [v.as_of for v in prep.valid] == split.valid_week_starts() == [split.valid_start]
    assert prep.end_history.as_of == split.holdout_start
    assert len(prep.data_window["data_sha256"]) == 64


def test_batches_put_positives_first_and_logq_is_log_expected_count(tiny_prep):
    _, _, cfg, prep = tiny_prep
    batch = next(T.iterate_batches(prep, cfg, np.random.default_rng(0)))
    b, m, n = batch.customer_rows.size, cfg.train.uniform_negatives, prep.tables.n_articles
    assert b == cfg.train.batch_size and batch.cand_rows.size == b + m
    assert batch.cust_cats.shape == (b, len(cfg.features.customer))
    assert batch.hist.shape == (b, cfg.features.history_length, len(cfg.features.history))
    # every candidate row's features equal the catalogue row's (up to id dropout on the id column)
    assert batch.cand_cats.shape[0] == np.unique(batch.cand_rows).size
    # log Q = log(B * q_week(a) + M / N), q_week from the shard the batch came from
    shard = next(p for p in prep.shards if _is_from(p, batch))
    _, art, _, _ = dataset._load_shard(shard)
    q = np.bincount(art, minlength=n) / art.size
    assert np.allclose(batch.log_q, np.log(b * q[batch.cand_rows] + m / n), rtol=1e-5)


def _is_from(path, batch) -> bool:
    cust, art, _, _ = dataset._load_shard(path)
    pairs = set(zip(cust.tolist(), art.tolist()))
    return all(p in pairs for p in zip(batch.customer_rows.tolist(), batch.cand_rows[:8].tolist()))


@pytest.mark.parametrize("threads,sparse_min_rows", [(1, 4096), (2, 4096), (2, 64)])
def test_tiny_end_to_end_beats_random_and_is_deterministic(tiny_prep, threads, sparse_min_rows):
    _, _, cfg, prep = tiny_prep
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=threads),
                              model=dataclasses.replace(cfg.model, sparse_min_rows=sparse_min_rows))
    model, logs, best = T.fit(prep, cfg, progress=False)
    if sparse_min_rows == 64:  # the id tables' path: sparse bags and RowSparseAdam
        assert len(model.sparse_parameters()) >= 2
    random_recall = 12 / prep.tables.n_articles
    valid = logs[best - 1].valid
    assert valid["recall@12"] > 5 * random_recall, valid
    assert logs[-1].train_loss < logs[0].train_loss
    again, logs2, best2 = T.fit(prep, cfg, progress=False)
    assert best2 == best and [e.valid for e in logs2] == [e.valid for e in logs]
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert not torch.are_deterministic_algorithms_enabled()  # the global switch is restored


def test_early_stopping_keeps_the_best_epoch(tiny_prep):
    _, _, cfg, prep = tiny_prep
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=6, patience=1, lr=0.05,
                                                             min_valid_customers=0))
    assert T.early_stopping(prep, cfg)
    model, logs, best = T.fit(prep, cfg, progress=False)
    scores = [e.valid["recall@12"] for e in logs]
    assert best == 1 + int(np.argmax(scores))
    assert len(logs) == len(scores) and (len(logs) == 6 or scores[-1] <= max(scores))
    again = T.evaluate_valid(model, prep, cfg)
    assert again["recall@12"] == pytest.approx(max(scores))


def test_too_few_validation_customers_train_a_fixed_number_of_epochs(tiny_prep):
    """A small validation week must not pick the epoch: all epochs run, the last weights are kept."""
    _, _, cfg, prep = tiny_prep
    n = sum(len(v.truth) for v in prep.valid)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3, patience=1, lr=0.05,
                                                             min_valid_customers=n + 1))
    assert not T.early_stopping(prep, cfg)
    model, logs, best = T.fit(prep, cfg, progress=False)
    assert best == 3 and len(logs) == 3
    assert T.evaluate_valid(model, prep, cfg) == logs[-1].valid  # the last epoch's weights, not the best


def test_validation_weeks_pool_until_enough_customers(tiny_warehouse_ro):
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.split import Split, choose_valid_weeks

    wh = Warehouse(tiny_warehouse_ro)
    holdout = wh.last_complete_week()
    week = dt.timedelta(weeks=1)
    buyers = [int(wh.transactions(holdout - i * week, holdout - (i - 1) * week, ["customer_id"])["customer_id"]
                  .nunique()) for i in (1, 2, 3)]
    assert choose_valid_weeks(wh, holdout, buyers[0], 3) == 1
    assert choose_valid_weeks(wh, holdout, buyers[0] + 1, 3) == 2
    assert choose_valid_weeks(wh, holdout, sum(buyers) + 1, 3) == 3  # never enough: the most allowed
    split = Split.for_training(wh, 4, holdout, valid_weeks=0, min_valid_customers=buyers[0] + 1, max_valid_weeks=3)
    assert split.valid_weeks == 2 and split.holdout_start == holdout and split.train_weeks == 4
    assert split.valid_week_starts() == [holdout - 2 * week, holdout - week] and split.last_week_start == holdout - week
    assert Split.for_training(wh, 4, holdout, valid_weeks=3).valid_weeks == 3  # explicit wins


def test_prepare_pools_several_validation_weeks(tiny_warehouse_ro, tmp_path):
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.split import Split

    wh = Warehouse(tiny_warehouse_ro)
    cfg = tiny_config()
    split = Split.from_warehouse(wh, train_weeks=4, valid_weeks=2)
    prep = T.prepare(wh, split, cfg, tmp_path / "shards", progress=False)
    assert len(prep.shards) == 4 and [v.as_of for v in prep.valid] == split.valid_week_starts()
    for v in prep.valid:  # each week's truth is its own buyers, features as of its own start
        tx = wh.transactions(v.as_of, v.as_of + dt.timedelta(weeks=1), ["customer_id"])
        assert set(v.truth) == set(tx["customer_id"].astype(str)) and v.history.as_of == v.as_of
    pooled = T.evaluate_valid(T.build_model(cfg, prep.state), prep, cfg)
    assert pooled["n_customers"] == sum(len(v.truth) for v in prep.valid)


# -- the Recommender and the bundle --------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_prep):
    _, _, cfg, prep = tiny_prep
    one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1))
    return T.fit(prep, one, progress=False)[0]


def test_recommender_is_exact_top_k_and_never_fails_on_unknown_customers(tiny_prep, tiny_model):
    _, _, _, prep = tiny_prep
    rec = T.recommender(tiny_model, prep, prep.end_history, prep.end_raw)
    emb = rec.article_embeddings()
    assert emb.shape == (prep.tables.n_articles, rec.dim) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    cid = rec.known_customer_ids()[int(prep.end_history.customer_rows[0])]
    assert rec.known_customer(cid) and not rec.known_customer("nobody")
    q = rec.customer_embeddings([cid, "nobody", "somebody else"])
    assert q.shape == (3, rec.dim) and np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(q[1], q[2])  # unknown customers share the features-only OOV embedding
    rows, scores = rec.recommend_rows([cid], k=10)
    brute = q[0] @ emb.T
    assert rows[0].tolist() == np.argsort(-brute, kind="stable")[:10].tolist()
    assert np.allclose(scores[0], np.sort(brute)[::-1][:10], atol=1e-6)
    bought = rec.purchased(cid)
    assert bought and bought[0] in prep.tables.article_index
    kept = [a for a, _ in rec.recommend([cid], k=len(bought) + 5, exclude_purchased=True)[0]]
    assert len(kept) == len(bought) + 5 and not set(kept) & set(bought)
    assert rec.purchased("nobody") == []


def test_bundle_round_trip_is_identical_and_pickle_free(tmp_path, tiny_prep, tiny_model):
    from hm_recsys import bundle

    _, split, cfg, prep = tiny_prep
    rec = T.recommender(tiny_model, prep, prep.end_history, prep.end_raw)
    full = {"features": cfg.features.to_dict(), "model": tiny_model.config.to_dict(),
            "train": dataclasses.asdict(cfg.train)}
    path = bundle.save(tmp_path / "bundle", rec, full, prep.data_window, {"holdout": {}})
    for name in bundle.FILES:
        assert (path / name).exists(), name
    weights = torch.load(path / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    again = bundle.load(path)
    assert again.as_of == split.holdout_start and again.article_ids == rec.article_ids
    assert np.array_equal(again.article_embeddings(), rec.article_embeddings())
    ids = [*rec.known_customer_ids()[:50], "nobody"]
    assert np.array_equal(again.customer_embeddings(ids), rec.customer_embeddings(ids))
    assert again.recommend(ids[:3], k=5) == rec.recommend(ids[:3], k=5)
    (path / "model.pt").unlink()
    with pytest.raises(bundle.BundleError, match="missing model.pt"):
        bundle.load(path)
    with pytest.raises(bundle.BundleError, match="not a model bundle"):
        bundle.load(tmp_path)


def test_replay_to_recomputes_the_training_features_over_the_warehouses_tables(tiny_prep, tiny_model):
    """A served state's replay gives exactly the features training had at the same date, and weekly sales."""
    from hm_recsys.served import replay_to

    wh, split, _, prep = tiny_prep
    rec = T.recommender(tiny_model, prep, prep.end_history, prep.end_raw)
    again, weekly = replay_to(rec, wh, split.holdout_start, lookback_weeks=2, progress=False)
    for field in ("customer_rows", "indptr", "article_rows", "days_ago"):
        assert np.array_equal(getattr(again.history, field), getattr(prep.end_history, field)), field
    assert np.array_equal(again.raw.sales_last_week, prep.end_raw.sales_last_week)
    assert np.array_equal(again.raw.age_days, prep.end_raw.age_days)
    assert np.array_equal(again.customer_embeddings(rec.known_customer_ids()[:20]),
                          rec.customer_embeddings(rec.known_customer_ids()[:20]))
    # weekly sales per age bucket of the 2 weeks before: they add up to last week's article sales
    assert sorted(weekly) == [split.holdout_start - dt.timedelta(weeks=w) for w in (2, 1)]
    assert np.array_equal(weekly[split.holdout_start - dt.timedelta(weeks=1)].sum(axis=0),
                          prep.end_raw.sales_last_week)


def test_an_id_missing_from_its_table_names_the_row():
    import pandas as pd

    from hm_recsys.features import Tables

    tables = Tables(pd.DataFrame({"article_id": ["0000000001"]}), pd.DataFrame({"customer_id": ["a" * 64]}))
    tx = pd.DataFrame({"t_dat": pd.to_datetime(["2020-09-16", "2020-09-17"]), "customer_id": ["a" * 64, "b" * 64],
                       "article_id": ["0000000001", "0000000001"]})
    with pytest.raises(ValueError, match="week X: row 1 has customer_id 'bbbb.*not in the customers table"):
        tables.encode_rows(tx, where="week X")
    assert tables.customer_rows(["a" * 64, "c" * 64]).tolist() == [0, tables.unknown_row]
    assert tables.customer_rows(["a" * 64] * 9 + ["c" * 64]).tolist() == [0] * 9 + [tables.unknown_row]


def test_cli_reports_bad_options_and_missing_data_in_one_line(tmp_path, home, capsys):
    assert T.main(["--set", "train.epochs=x", "--warehouse", str(tmp_path)]) == 1
    assert "option 'epochs' must be int" in capsys.readouterr().err
    assert T.main(["--warehouse", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hm-recsys train:") and "ingest" in err
