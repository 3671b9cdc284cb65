"""Benchmark: ScaNN vs exact (numpy brute force) retrieval at H&M scale.

    .venv/bin/python bench/index.py                       # full scale, synthetic clustered embeddings
    .venv/bin/python bench/index.py --bundle var/runs/<run>/bundle   # a trained model's real embeddings
    .venv/bin/python bench/index.py --articles 5000 --customers 50000 # smaller

Prints build time, single-query and batch QPS, recall@12 vs exact, and the
time to score every customer, each next to the exact baseline measured in
the same run (ratios, so a noisy shared machine still gives comparable figures).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hm_recsys.index import ExactIndex, build_index, load_index, recall_vs_exact  # noqa: E402


def clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def timed(fn, *args, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--articles", type=int, default=105_542)
    p.add_argument("--customers", type=int, default=1_371_980, help="queries for the batch-scoring figure")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=12)
    p.add_argument("--bundle", type=Path, help="use a trained bundle's article/customer embeddings")
    p.add_argument("--exact-sample", type=int, default=20_000, help="customers scored exactly (then extrapolated)")
    a = p.parse_args()

    if a.bundle:
        from hm_recsys.bundle import load

        rec = load(a.bundle)
        ids, emb = rec.article_ids, rec.article_embeddings()
        cust_ids = rec.known_customer_ids()[: a.customers]
        queries = rec.customer_embeddings(cust_ids)
        source = f"bundle {a.bundle}"
    else:
        ids = [f"{i:010d}" for i in range(a.articles)]
        emb = clustered(a.articles, a.dim, clusters=400, seed=0)
        queries = clustered(a.customers, a.dim, clusters=400, seed=1)
        source = "synthetic clustered embeddings"
    n, d = emb.shape
    print(f"# index benchmark: {n:,} articles x {d} dims, {len(queries):,} customer queries ({source})")

    exact = ExactIndex(ids, emb)
    with tempfile.TemporaryDirectory() as tmp:
        eval_q = queries[np.random.default_rng(2).choice(len(queries), size=min(2000, len(queries)), replace=False)]
        t_build, manifest = timed(build_index, ids, emb, Path(tmp) / "index", "bench", eval_q)
        t_load, (scann_idx, _) = timed(load_index, Path(tmp) / "index")
    cfg = manifest.scann_config
    print(f"build+tune+verify: {t_build:.2f} s  (leaves={cfg['num_leaves']} search={cfg['leaves_to_search']} "
          f"reorder={cfg['reorder']} brute_force={cfg['brute_force']}), load {t_load:.2f} s")

    # single-query latency: what a /recommend call pays
    one = queries[:200]
    t_s1, _ = timed(lambda: [scann_idx.search(q, a.k) for q in one], repeat=3)
    t_e1, _ = timed(lambda: [exact.search(q, a.k) for q in one], repeat=3)
    print(f"single query  : ScaNN {len(one) / t_s1:9.0f} q/s   exact {len(one) / t_e1:9.0f} q/s   "
          f"ratio {t_e1 / t_s1:5.1f}x")

    # batch of 10k queries
    batch = queries[:10_000]
    t_sb, _ = timed(scann_idx.search, batch, a.k, repeat=2)
    t_eb, _ = timed(exact.search, batch, a.k, repeat=1)
    print(f"batch 10k     : ScaNN {len(batch) / t_sb:9.0f} q/s   exact {len(batch) / t_eb:9.0f} q/s   "
          f"ratio {t_eb / t_sb:5.1f}x")

    recall = recall_vs_exact(scann_idx, exact, queries[:5000], k=a.k)
    print(f"recall@{a.k} vs exact on 5,000 customers: {recall:.4f} (floor {manifest.min_recall})")

    # score every customer: ScaNN for real, exact on a sample and extrapolated
    t_all = 0.0
    for s in range(0, len(queries), 100_000):
        dt_, _ = timed(scann_idx.search, queries[s : s + 100_000], a.k)
        t_all += dt_
    sample = queries[: a.exact_sample]
    t_es, _ = timed(exact.search, sample, a.k)
    t_exact_all = t_es * len(queries) / len(sample)
    print(f"all {len(queries):,} customers: ScaNN {t_all:7.1f} s   exact ~{t_exact_all:7.1f} s "
          f"(extrapolated from {len(sample):,})   ratio {t_exact_all / t_all:5.1f}x")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
