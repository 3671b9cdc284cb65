"""Ranking metrics on hand-computed cases and against Kaggle's reference MAP@12."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from hm_recsys.evaluate import (
    Truth,
    comparison_table,
    coverage,
    evaluate_rankings,
    map_at_12,
    ndcg_at_12,
    per_customer_metrics,
    plot_recall_curves,
    predictions_from_frame,
    predictions_from_index,
    recall_at_k,
    recall_curve,
    relevant_sets,
    score_all,
)


# -- Kaggle's reference implementation, literally (benhamner/Metrics, ml_metrics/average_precision.py)
def apk(actual, predicted, k=10):
    if len(predicted) > k:
        predicted = predicted[:k]
    score = 0.0
    num_hits = 0.0
    for i, p in enumerate(predicted):
        if p in actual and p not in predicted[:i]:
            num_hits += 1.0
            score += num_hits / (i + 1.0)
    if not actual:
        return 0.0
    return score / min(len(actual), k)


def mapk(actual, predicted, k=10):
    return np.mean([apk(a, p, k) for a, p in zip(actual, predicted)])


def _dcg_ideal(n: int) -> float:
    return sum(1 / math.log2(i + 2) for i in range(min(n, 12)))


# Three scored customers; "c" has no prediction at all.
TRUTH = {"a": {"x", "y"}, "b": {"z"}, "c": {"p", "q", "r"}}
PREDS = {"a": ["x", "m", "y"], "b": ["m", "z", "z"], "zz-not-scored": ["p", "q", "r"]}


def test_hand_case_recall_map_ndcg():
    assert recall_at_k(PREDS, TRUTH, 1) == pytest.approx((1 / 2 + 0 + 0) / 3)
    assert recall_at_k(PREDS, TRUTH, 2) == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert recall_at_k(PREDS, TRUTH, 3) == pytest.approx((1 + 1 + 0) / 3)
    # a: hits at ranks 1 and 3 -> (1/1 + 2/3) / 2 ; b: hit at rank 2 -> (1/2) / 1 ; c: 0
    assert map_at_12(PREDS, TRUTH) == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2 + 0) / 3)
    ndcg_a = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    ndcg_b = (1 / math.log2(3)) / 1
    assert ndcg_at_12(PREDS, TRUTH) == pytest.approx((ndcg_a + ndcg_b + 0) / 3)


def test_per_customer_arrays_are_aligned_to_sorted_customers():
    m = per_customer_metrics(PREDS, TRUTH, k=2)
    assert m.customer_ids.tolist() == ["a", "b", "c"]
    assert m.n_relevant.tolist() == [2, 1, 3]
    assert m.recall.tolist() == [0.5, 1.0, 0.0]
    assert m.ap12 == pytest.approx([(1 + 2 / 3) / 2, 0.5, 0.0])
    assert m.ndcg12[2] == 0.0 and m.k == 2
    # the gate pairs arrays of two models: same truth -> same order
    other = per_customer_metrics({"c": ["p"]}, TRUTH, k=2)
    assert other.customer_ids.tolist() == m.customer_ids.tolist()
    assert other.recall.tolist() == [0.0, 0.0, 1 / 3]


def test_duplicates_count_once_at_first_position_and_keep_their_slot():
    truth = {"a": {"x", "y"}}
    preds = {"a": ["x", "x", "y"]}
    # Kaggle: hit at 1, repeat skipped, hit at 3 -> (1 + 2/3) / 2
    assert map_at_12(preds, truth) == pytest.approx((1 + 2 / 3) / 2) == pytest.approx(apk(["x", "y"], preds["a"], 12))
    assert recall_at_k(preds, truth, 2) == 0.5  # the repeat used up slot 2
    assert recall_at_k(preds, truth, 3) == 1.0
    assert ndcg_at_12(preds, truth) == pytest.approx((1 + 1 / math.log2(4)) / _dcg_ideal(2))
    # a relevant id repeated many times never pushes recall above 1
    assert recall_at_k({"a": ["x"] * 20}, truth, 20) == 0.5


def test_fewer_than_12_predictions():
    truth = {"a": {"x", "y", "w"}}
    preds = {"a": ["m", "y"]}
    assert map_at_12(preds, truth) == pytest.approx((1 / 2) / 3)
    assert recall_at_k(preds, truth, 12) == pytest.approx(1 / 3)
    assert recall_at_k(preds, truth, 100) == pytest.approx(1 / 3)
    assert recall_curve(preds, truth, 5).tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 1 / 3])


def test_more_than_12_relevant():
    rel = {f"{i:010d}" for i in range(15)}
    preds = {"a": sorted(rel)[:12] + ["nope"]}
    truth = {"a": rel}
    assert map_at_12(preds, truth) == 1.0  # divided by min(15, 12)
    assert ndcg_at_12(preds, truth) == pytest.approx(1.0)
    assert recall_at_k(preds, truth, 12) == pytest.approx(12 / 15)
    # hits beyond 12 do not count for MAP
    late = {"a": ["nope"] * 11 + sorted(rel)}
    assert map_at_12(late, truth) == pytest.approx((1 / 12) / 12)
    assert recall_at_k(late, truth, 100) == 1.0


def test_customer_without_prediction_counts_zero():
    truth = {"a": {"x"}, "b": {"y"}}
    assert recall_at_k({"a": ["x"]}, truth, 12) == 0.5
    assert map_at_12({"a": ["x"]}, truth) == 0.5
    assert recall_at_k({}, truth, 12) == 0.0
    assert recall_at_k({"a": []}, truth, 12) == 0.0


def test_matches_kaggle_mapk_on_random_cases():
    rng = np.random.default_rng(0)
    vocab = [f"{i:010d}" for i in range(40)]
    for case in range(30):
        n = int(rng.integers(1, 60))
        truth, preds = {}, {}
        for c in range(n):
            cid = f"c{c:03d}"
            truth[cid] = set(rng.choice(vocab, size=int(rng.integers(1, 20)), replace=True).tolist())
            if rng.random() < 0.85:  # some customers get no prediction
                # with replacement: repeated ids inside a list, as a buggy model could emit
                preds[cid] = rng.choice(vocab, size=int(rng.integers(0, 30)), replace=True).tolist()
        ids = sorted(truth)
        ref = mapk([sorted(truth[c]) for c in ids], [preds.get(c, []) for c in ids], k=12)
        assert map_at_12(preds, truth) == pytest.approx(ref, abs=1e-12), case
        ref_apk = [apk(sorted(truth[c]), preds.get(c, []), 12) for c in ids]
        assert per_customer_metrics(preds, truth).ap12 == pytest.approx(ref_apk, abs=1e-12)


def test_recall_curve_is_monotone_and_equals_recall_at_each_k():
    rng = np.random.default_rng(1)
    vocab = [f"{i:010d}" for i in range(200)]
    truth = {f"c{c}": set(rng.choice(vocab, size=int(rng.integers(1, 8))).tolist()) for c in range(300)}
    preds = {c: rng.choice(vocab, size=100, replace=False).tolist() for c in list(truth)[:250]}
    curve = recall_curve(preds, truth, max_k=100)
    assert curve.shape == (100,)
    assert np.all(np.diff(curve) >= 0)
    for k in (1, 2, 5, 12, 37, 100):
        assert curve[k - 1] == pytest.approx(recall_at_k(preds, truth, k), abs=1e-12)


def test_ndcg_matches_direct_formula_on_random_cases():
    rng = np.random.default_rng(2)
    vocab = [f"{i:010d}" for i in range(30)]
    truth = {f"c{c}": set(rng.choice(vocab, size=int(rng.integers(1, 16))).tolist()) for c in range(100)}
    preds = {c: rng.choice(vocab, size=int(rng.integers(0, 20))).tolist() for c in truth}
    expected = []
    for c in sorted(truth):
        seen, dcg = set(), 0.0
        for i, a in enumerate(preds[c][:12]):
            if a in truth[c] and a not in seen:
                dcg += 1 / math.log2(i + 2)
            seen.add(a)
        expected.append(dcg / _dcg_ideal(len(truth[c])))
    assert per_customer_metrics(preds, truth).ndcg12 == pytest.approx(expected, abs=1e-12)


def test_coverage_and_evaluate_rankings_keys():
    truth = {"a": {"x"}, "b": {"y"}}
    preds = {"a": ["x", "m"], "b": ["m", "n"], "other": ["q", "r"]}
    # distinct articles over the scored customers only: x, m, n
    assert coverage(preds, ["a", "b"], catalogue_size=10) == pytest.approx(0.3)
    assert coverage(preds, ["a", "b"], catalogue_size=10, k=1) == pytest.approx(0.2)
    assert math.isnan(coverage(preds, ["a"], catalogue_size=None))
    out = evaluate_rankings(preds, truth, catalogue_size=10)
    assert list(out) == ["recall@12", "recall@100", "map@12", "ndcg@12", "coverage@12", "n_customers"]
    assert out == {
        "recall@12": 0.5, "recall@100": 0.5, "map@12": 0.5, "ndcg@12": 0.5, "coverage@12": pytest.approx(0.3),
        "n_customers": 2.0,
    }


def test_relevant_sets_from_warehouse_frame():
    tx = pd.DataFrame(
        {
            "customer_id": pd.Categorical(["b", "a", "a", "b", "a"], categories=["b", "a", "unused"]),
            "article_id": pd.Categorical(["0000000002", "0000000001", "0000000001", "0000000003", "0000000002"]),
            "price": [0.1] * 5,
        }
    )
    truth = relevant_sets(tx)
    assert isinstance(truth, Truth) and len(truth) == 2
    assert truth.customer_ids.tolist() == ["a", "b"]  # sorted by id, not by category order
    assert truth["a"] == frozenset({"0000000001", "0000000002"})  # the repeated row counts once
    assert dict(truth) == {"a": {"0000000001", "0000000002"}, "b": {"0000000002", "0000000003"}}
    assert truth.n_relevant.tolist() == [2, 2]


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="missing column 'article_id'"):
        relevant_sets(pd.DataFrame({"customer_id": ["a"]}))
    with pytest.raises(ValueError, match="row 1 has no customer_id"):
        relevant_sets(pd.DataFrame({"customer_id": ["a", None], "article_id": ["x", "y"]}))
    with pytest.raises(ValueError, match="no scored customers"):
        relevant_sets(pd.DataFrame({"customer_id": pd.Series([], dtype=str), "article_id": pd.Series([], dtype=str)}))
    with pytest.raises(ValueError, match="customer b has an empty relevant set"):
        Truth({"a": {"x"}, "b": set()})
    with pytest.raises(TypeError, match="customer a: expected a sequence of article ids, got a str"):
        recall_at_k({"a": "0000000001"}, {"a": {"0000000001"}}, 12)
    with pytest.raises(TypeError, match="customer a: article ids must be str"):
        recall_at_k({"a": [108775015]}, {"a": {"0108775015"}}, 12)
    with pytest.raises(ValueError, match="k must be >= 1"):
        recall_at_k({}, {"a": {"x"}}, 0)


def test_predictions_from_index_and_frame():
    rows = np.array([[2, 0, -1], [1, 1, 2]])
    preds = predictions_from_index(["c1", "c2"], ["0000000001", "0000000002", "0000000003"], rows)
    assert preds == {"c1": ["0000000003", "0000000001"], "c2": ["0000000002", "0000000002", "0000000003"]}
    frame = pd.DataFrame(
        {"customer_id": ["b", "a", "a", "a"], "article_id": ["x", "y", "z", "w"], "rank": [1, 3, 1, 2], "prob": 0.1}
    )
    assert predictions_from_frame(frame) == {"a": ["z", "w", "y"], "b": ["x"]}
    assert predictions_from_frame(frame, k=2) == {"a": ["z", "w"], "b": ["x"]}


def test_numpy_and_tuple_predictions_accepted():
    truth = {"a": {"x"}, "b": {"y"}}
    preds = {"a": np.array(["m", "x"], dtype=object), "b": ("y",)}
    assert recall_at_k(preds, truth, 2) == 1.0


def test_comparison_table_exact_text():
    results = {
        "model": {"recall@12": 0.05, "map@12": 0.0123, "n_customers": 1234.0, "coverage@12": float("nan")},
        "oracle": {"recall@12": 0.2, "map@12": 0.1, "n_customers": 1234.0, "coverage@12": 0.5},
    }
    assert comparison_table(results, title="holdout") == (
        "holdout\n"
        "model   recall@12  map@12  coverage@12  n_customers  of oracle r@12\n"
        "------  ---------  ------  -----------  -----------  --------------\n"
        "model      0.0500  0.0123            -        1,234           25.0%\n"
        "oracle     0.2000  0.1000       0.5000        1,234          100.0%"
    )
    # no oracle row -> no fraction column
    assert "of oracle" not in comparison_table({"model": results["model"]})
    with pytest.raises(ValueError, match="no results"):
        comparison_table({})


def test_score_all_and_plot(tmp_path):
    truth = {"a": {"x"}, "b": {"y"}}
    models = {"popularity": {"a": ["m", "x"], "b": ["m", "x"]}, "oracle": {"a": ["x"], "b": ["y"]}}
    results, curves = score_all(models, truth, catalogue_size=4, max_k=100)
    assert results["oracle"]["recall@12"] == 1.0 and results["popularity"]["recall@12"] == 0.5
    assert curves["popularity"].shape == (100,) and curves["popularity"][:2].tolist() == [0.0, 0.5]
    out = plot_recall_curves(curves, tmp_path / "sub" / "curves.png", title="Recall@K, holdout week 2020-09-16")
    assert out == tmp_path / "sub" / "curves.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_comparison_table_orders_recall_columns_by_k():
    header = comparison_table({"m": {"map@12": 0.1, "recall@50": 0.2, "recall@12": 0.1, "x": 1.0}}).splitlines()[0]
    assert header.split() == ["model", "recall@12", "recall@50", "map@12", "x"]
