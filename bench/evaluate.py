"""Benchmark: metric and baseline computation at H&M holdout scale.

    .venv/bin/python bench/evaluate.py                         # 80k scored customers x 100 predictions
    .venv/bin/python bench/evaluate.py --customers 20000 --k 50

Synthetic ids at full-scale shapes: ~80k scored customers with ~3.5
relevant articles each (Poisson), a 105k-article catalogue with long-tail
popularity, 100 predictions per customer. Every figure is printed next to a
baseline measured in the same run (ratios, so a noisy shared machine still
gives comparable figures): Kaggle's reference ``mapk`` (pure Python) for
MAP@12 and a per-customer set-intersection loop for Recall@K. Times are
CPU seconds of this process (``time.process_time``; single-threaded code, so
wall time on an idle core is the same).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hm_recsys.evaluate import (  # noqa: E402
    Truth,
    evaluate_rankings,
    per_customer_metrics,
    popularity_baseline,
    recall_curve,
    relevant_sets,
    repurchase_popularity_baseline,
)


def apk(actual, predicted, k=12):  # Kaggle's reference, verbatim logic
    if len(predicted) > k:
        predicted = predicted[:k]
    score, num_hits = 0.0, 0.0
    for i, p in enumerate(predicted):
        if p in actual and p not in predicted[:i]:
            num_hits += 1.0
            score += num_hits / (i + 1.0)
    return score / min(len(actual), k) if actual else 0.0


def naive_recall(preds, truth, k):
    return float(np.mean([len(set(preds.get(c, [])[:k]) & truth[c]) / len(truth[c]) for c in truth]))


def timed(fn, *args, **kw):
    """CPU seconds of this process: steadier than wall time on a shared, loaded machine."""
    t = time.process_time()
    out = fn(*args, **kw)
    return time.process_time() - t, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--customers", type=int, default=80_000)
    p.add_argument("--articles", type=int, default=105_542)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    import pandas as pd

    rng = np.random.default_rng(a.seed)
    vocab = np.array([f"{i:010d}" for i in range(a.articles)], dtype=object)
    weights = 1.0 / np.arange(1, a.articles + 1) ** 0.9  # long tail
    weights /= weights.sum()
    n_rel = np.maximum(1, rng.poisson(3.5, a.customers))
    cust = np.array([f"{i:064x}" for i in range(a.customers)], dtype=object)
    holdout = pd.DataFrame({
        "customer_id": pd.Categorical(np.repeat(cust, n_rel)),
        "article_id": pd.Categorical(vocab[rng.choice(a.articles, n_rel.sum(), p=weights)]),
    })
    print(f"# evaluate benchmark (CPU seconds): {a.customers:,} scored customers, {len(holdout):,} holdout rows, "
          f"{a.articles:,} articles, {a.k} predictions each")

    t_truth, truth = timed(relevant_sets, holdout)
    assert isinstance(truth, Truth)
    # a model's lists: popular-ish articles, distinct within a list
    pool = rng.choice(a.articles, size=(a.customers, a.k + 20), p=weights)
    rows = [list(dict.fromkeys(r.tolist()))[: a.k] for r in pool]
    preds = {c: vocab[r].tolist() for c, r in zip(cust, rows)}

    t_eval, res = timed(evaluate_rankings, preds, truth, ks=(12, a.k), catalogue_size=a.articles)
    t_pc, _ = timed(per_customer_metrics, preds, truth)
    t_curve, curve = timed(recall_curve, preds, truth, a.k)
    t_ref, ref = timed(lambda: float(np.mean([apk(truth[c], preds.get(c, []), 12) for c in truth])))
    t_naive, naive = timed(naive_recall, preds, truth, a.k)
    assert abs(ref - res["map@12"]) < 1e-12 and abs(naive - res[f"recall@{a.k}"]) < 1e-12
    assert abs(curve[-1] - naive) < 1e-9

    print(f"relevant_sets (holdout frame -> Truth):   {t_truth:6.3f} s")
    print(f"evaluate_rankings (all headline metrics): {t_eval:6.3f} s")
    print(f"per_customer_metrics (recall, AP, NDCG):  {t_pc:6.3f} s")
    print(f"recall_curve K=1..{a.k}:                  {t_curve:6.3f} s")
    print(f"  baseline: Kaggle mapk (reference apk):  {t_ref:6.3f} s  -> MAP@12 {ref:.5f} (ours equal; "
          f"{t_ref / t_pc:.1f}x per_customer_metrics time)")
    print(f"  baseline: set-intersection Recall@{a.k}: {t_naive:6.3f} s  -> {naive:.5f} (ours equal; "
          f"{t_naive / t_curve:.1f}x recall_curve time for all {a.k} cutoffs)")

    # baselines: last week ~ 270k rows, 4-week lookback ~ 1.1M rows (full-scale H&M volumes)
    n_week = 270_000
    last_week = pd.DataFrame({
        "customer_id": pd.Categorical(rng.choice(cust, n_week)),
        "article_id": pd.Categorical(vocab[rng.choice(a.articles, n_week, p=weights)]),
    })
    days = np.datetime64("2020-08-19") + rng.integers(0, 28, 4 * n_week).astype("timedelta64[D]")
    all_cust = np.array([f"{i:064x}" for i in range(a.customers * 10)], dtype=object)  # 10x more buyers
    recent = pd.DataFrame({
        "t_dat": days.astype("datetime64[s]"),
        "customer_id": pd.Categorical(rng.choice(all_cust, 4 * n_week)),
        "article_id": pd.Categorical(vocab[rng.choice(a.articles, 4 * n_week, p=weights)]),
    })
    t_pop, pop = timed(popularity_baseline, last_week, truth.customer_ids, a.k)
    t_rep, rep = timed(repurchase_popularity_baseline, recent, last_week, truth.customer_ids, a.k)
    t_rep_eval, rep_res = timed(evaluate_rankings, rep, truth, ks=(12, a.k), catalogue_size=a.articles)
    print(f"popularity_baseline:                      {t_pop:6.3f} s")
    print(f"repurchase_popularity_baseline ({len(recent):,} rows): {t_rep:6.3f} s")
    print(f"evaluate_rankings on it:                  {t_rep_eval:6.3f} s  (recall@12 {rep_res['recall@12']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
