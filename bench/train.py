"""Benchmark: two-tower training throughput at H&M full-scale shapes, and one full weekly retrain.

    .venv/bin/python bench/train.py                          # throughput at full-scale shapes (~2 min)
    .venv/bin/python bench/train.py --warehouse /tmp/me/wh   # + one full retrain on a 12-week window
    .venv/bin/python bench/train.py --steps 20 --threads 1   # quicker / single-threaded
    .venv/bin/python bench/train.py --profile 10             # + where a step's time goes (torch.profiler)

Throughput runs real training steps (towers, corrected in-batch softmax,
optimisers) on random inputs with the shapes of a 12-week window of the full
H&M data (~600k customer ids, 105k articles, B = 2048, L = 32, M = 512
uniform negatives) and prints, next to it, figures measured in the same run:

* the FLOP lower bound: the step's matrix-multiply FLOPs (both MLPs and the
  B x C logits, forward + backward) divided by the GEMM rate this machine
  reaches on the same shapes, probed right after every timed step (a shared
  host's speed drifts by ~20% within minutes; a rate taken once, before the
  steps, drifted the ratio with it); "efficiency" = bound / measured, from
  the medians, and step by step against each step's own probe;
* the dense-gradient baseline: the same model with every table dense and
  Adam on all of it, the naive alternative to sparse id updates.

Then every full-scale customer (1.37M) is scored through the customer tower's
inference path, as a served state's query embeddings are, against that
pass's FLOP lower bound at the same GEMM rate (skip with ``--no-scoring``).

``--warehouse`` then runs ``train.run_training`` (data replay, training with
early stopping, holdout evaluation with baselines, bundle, MLflow logging)
into a throwaway runtime folder and prints the wall time of each stage with
the training part's FLOP lower bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from hm_recsys import train as T  # noqa: E402
from hm_recsys.features import FeatureConfig, FeatureState  # noqa: E402
from hm_recsys.model import ModelConfig, TwoTower  # noqa: E402

# 12-week window of the full data: ids that bought in it (~46% of 1.37M customers), whole catalogue
FULL_CARDS = {
    "customer_id": 630_000, "age": 13, "club_member_status": 4, "fashion_news_frequency": 5, "fn": 3,
    "active": 3, "postal_code": 1025, "history_length": 7,
    "article_id": 100_000, "product_code": 45_000, "product_type": 130, "product_group": 20,
    "graphical_appearance": 31, "colour_group": 51, "perceived_colour_value": 9, "perceived_colour_master": 21,
    "department": 300, "index": 11, "index_group": 6, "section": 57, "garment_group": 22,
    "price_band": 11, "age_since_launch": 9, "sales_last_week": 15,
}
N_ARTICLES = 105_542


def resolved(config: T.Config, sparse: bool = True) -> ModelConfig:
    fc = config.features
    mc = config.model if sparse else dataclasses.replace(config.model, sparse_min_rows=10**12)
    pick = lambda names: {n: FULL_CARDS[n] for n in names}  # noqa: E731
    return mc.with_features(pick(fc.customer), pick(fc.article), pick(fc.history))


def random_customer_inputs(fc: FeatureConfig, n: int, rng: np.random.Generator):
    """``(cats, hist, weights)`` of ``n`` customers: full-scale ids, 0..L history slots each (padding = cardinality),
    equal weights over the real slots (``FeatureState.customer_inputs``' layout)."""
    L = fc.history_length
    cats = np.stack([rng.integers(0, FULL_CARDS[f], n) for f in fc.customer], 1)
    n_hist = rng.integers(0, L + 1, n)
    hist = np.stack([rng.integers(0, FULL_CARDS[f], (n, L)) for f in fc.history], 2)
    pad = np.arange(L)[None, :] >= n_hist[:, None]
    for j, f in enumerate(fc.history):
        hist[:, :, j][pad] = FULL_CARDS[f]
    w = np.where(pad, 0.0, 1.0)
    return cats, hist, (w / np.maximum(w.sum(1, keepdims=True), 1)).astype(np.float32)


def random_batches(config: T.Config, n: int, seed: int = 0) -> list[T.Batch]:
    """Batches with the shapes and duplication of real ones (Zipf-like article popularity)."""
    rng = np.random.default_rng(seed)
    fc, tc = config.features, config.train
    b, m = tc.batch_size, tc.uniform_negatives
    pop = 1.0 / np.arange(1, N_ARTICLES + 1) ** 0.9
    pop /= pop.sum()
    art_feats = np.stack([rng.integers(0, FULL_CARDS[f], N_ARTICLES) for f in fc.article], 1)
    out = []
    for _ in range(n):
        cats, hist, w = random_customer_inputs(fc, b, rng)
        pos = rng.choice(N_ARTICLES, b, p=pop)
        cand = np.concatenate([pos, rng.integers(0, N_ARTICLES, m)])
        uniq, inv = np.unique(cand, return_inverse=True)
        q = np.bincount(pos, minlength=N_ARTICLES) / b
        log_q = np.log(b * q[cand] + m / N_ARTICLES).astype(np.float32)
        out.append(T.Batch(cats, hist, w, cand, art_feats[uniq], inv, log_q, rng.integers(0, 630_000, b)))
    return out


def mlp_flops(mc: ModelConfig, tower: str) -> int:
    """Forward FLOPs of one row through a tower's MLP (``tower``: "customer" or "article")."""
    inputs = (*mc.customer, *mc.history) if tower == "customer" else mc.article
    d_in = sum(s.dim for s in inputs)
    dims = [d_in, *getattr(mc, f"{tower}_layers"), mc.output_dim]
    return sum(2 * a * b for a, b in zip(dims, dims[1:]))


def step_flops(mc: ModelConfig, batch: T.Batch) -> float:
    """Matrix-multiply FLOPs of one training step (forward + backward = 3x forward)."""
    b, c, u = batch.customer_rows.size, batch.cand_rows.size, batch.cand_cats.shape[0]
    forward = b * mlp_flops(mc, "customer") + u * mlp_flops(mc, "article") + 2 * b * c * mc.output_dim
    return 3.0 * forward


def gemm_probe(mc: ModelConfig, batch: T.Batch):
    """A callable that runs the step's own matrix shapes (logits and MLP layers) once each and returns the FLOP/s
    torch reached on them right then: the baseline, measured next to every timed step."""
    b, c, d = batch.customer_rows.size, batch.cand_rows.size, mc.output_dim
    h = mc.customer_layers[0] if mc.customer_layers else d
    shapes = [(b, d, c), (b, c, d), (b, h, h), (b, h, d)]
    mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    flops = sum(2.0 * m * k * n for m, k, n in shapes)

    def probe() -> float:
        t0 = time.perf_counter()
        for x, y in mats:
            torch.mm(x, y)
        return flops / (time.perf_counter() - t0)

    return probe


def gemm_rate(mc: ModelConfig, batch: T.Batch, seconds: float = 2.0) -> float:
    """FLOP/s of the step's own matrix shapes, as fast as torch runs them here (median over ``seconds``)."""
    probe, rates, t0 = gemm_probe(mc, batch), [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rates.append(probe())
    return float(np.median(rates))


def run_steps(model: TwoTower, config: T.Config, batches: list[T.Batch], dense_adam: bool,
              profile: int = 0, probe=None) -> tuple[np.ndarray, np.ndarray]:
    """(seconds, GEMM FLOP/s) of each timed step of the real training step (``train.train_step`` under
    ``train.training_kernels``, as ``fit`` runs it), after 2 warm-up steps.

    With ``probe`` (``gemm_probe``), the baseline's matrix products run right after every timed step, so
    each step is paired with the GEMM rate of its own moment: on a shared host, whose speed drifts by 20%
    within a minute, a rate measured once before the steps made the ratio drift with it. (Rates are empty
    without a probe.) ``profile`` > 0 prints the torch.profiler table of that many more steps.
    """
    tc = config.train
    if dense_adam:
        opts = [torch.optim.Adam(model.parameters(), lr=tc.lr)]
    else:
        opts = T.make_optimizers(model, config)
    times, rates = [], []
    with T.training_kernels(tc.threads):
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            T.train_step(model, opts, batch, config)
            if i >= 2:
                times.append(time.perf_counter() - t0)
                if probe is not None:
                    rates.append(probe())
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for batch in batches[2:2 + profile]:
                    T.train_step(model, opts, batch, config)
            print(f"\n== where a step's time goes (torch.profiler, {profile} steps; self CPU time per op)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return np.array(times), np.array(rates)


def throughput(config: T.Config, steps: int, dense_steps: int, profile: int = 0) -> dict[str, float]:
    torch.manual_seed(0)
    batches = random_batches(config, steps + 2)
    mc = resolved(config)
    model = TwoTower(mc)
    flops = step_flops(mc, batches[0])
    once = gemm_rate(mc, batches[0])  # before the steps, as earlier versions of this benchmark measured it
    times, rates = run_steps(model, config, batches, dense_adam=False, profile=profile, probe=gemm_probe(mc, batches[0]))
    sec, rate = float(np.median(times)), float(np.median(rates))
    paired = np.median(flops / rates / times)  # each step against the bound of its own moment
    b = config.train.batch_size
    bound = flops / rate
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
          f"({sum(p.numel() for p in model.sparse_parameters()) / 1e6:.1f}M in sparse id tables), "
          f"B={b}, C={batches[0].cand_rows.size}, L={config.features.history_length}, threads={torch.get_num_threads()}")
    print(f"GEMM rate on the step's shapes (baseline): {rate / 1e9:7.1f} GFLOP/s (median of a probe after each "
          f"timed step; {once / 1e9:.1f} measured once before the steps)")
    print(f"FLOPs per step: {flops / 1e9:.2f} GFLOP = {flops / b / 1e6:.2f} MFLOP per example")
    print(f"training step (sparse Adam + AdamW):    {sec * 1e3:7.1f} ms/step = {b / sec:8,.0f} examples/s")
    print(f"  FLOP lower bound:                     {bound * 1e3:7.1f} ms/step = {b / bound:8,.0f} examples/s "
          f"(measured / bound = {sec / bound:.2f}x; efficiency = bound / measured = {bound / sec:.2f}, target 0.6)")
    q1, q3 = np.percentile(flops / rates / times, [25, 75])
    print(f"  efficiency step by step (each step / the bound of its own moment): median {paired:.2f}, "
          f"IQR {q1:.2f}-{q3:.2f} over {times.size} steps")
    dense_sec = float("nan")
    if dense_steps:
        dense = TwoTower(resolved(config, sparse=False))
        dense_sec = float(np.median(run_steps(dense, config, batches[: dense_steps + 2], dense_adam=True)[0]))
        print(f"dense baseline (all tables dense, Adam):  {dense_sec * 1e3:7.1f} ms/step = {b / dense_sec:8,.0f} "
              f"examples/s -> sparse is {dense_sec / sec:.1f}x faster")
    return {"examples_per_second": b / sec, "bound_examples_per_second": b / bound, "gemm_flops": rate,
            "efficiency": bound / sec, "paired_efficiency": float(paired),
            "flops_per_example": flops / b, "dense_examples_per_second": b / dense_sec}


N_CUSTOMERS = 1_371_980  # every customer of the full data: what a served state embeds


def scoring(config: T.Config, gemm: float, chunk: int = 65_536) -> dict[str, float]:
    """Query embeddings of every customer (the served state's ``queries.npy``; the gate's and evaluation's
    scoring is the same tower on fewer customers) through the inference path, against its FLOP bound."""
    mc = resolved(config)
    model = TwoTower(mc).eval()
    # one chunk of random inputs, reused: input building is the feature replay's cost, timed by the pipeline
    cats, hist, w = map(torch.from_numpy, random_customer_inputs(config.features, chunk, np.random.default_rng(1)))
    flops_per_customer = mlp_flops(mc, "customer")
    with torch.inference_mode():
        model.customer_embedding(cats[:1024], hist[:1024], w[:1024])  # warm-up
        t0 = time.perf_counter()
        done = 0
        while done < N_CUSTOMERS:
            n = min(chunk, N_CUSTOMERS - done)
            model.customer_embedding(cats[:n], hist[:n], w[:n])
            done += n
        sec = time.perf_counter() - t0
    bound = N_CUSTOMERS * flops_per_customer / gemm
    print(f"\n== scoring every customer: {N_CUSTOMERS:,} query embeddings (customer tower, inference path, "
          f"chunks of {chunk:,})")
    print(f"  measured {sec:6.1f} s = {N_CUSTOMERS / sec:,.0f} customers/s (target <= 60 s: "
          f"{'PASS' if sec <= 60 else 'MISS'})")
    print(f"  FLOP lower bound {bound:6.1f} s ({flops_per_customer / 1e3:.0f} kFLOP per customer at the GEMM rate "
          f"above; efficiency = bound / measured = {bound / sec:.2f})")
    return {"score_seconds": sec, "score_bound_seconds": bound}


def full_retrain(warehouse: Path, config: T.Config, gemm: float, flops_per_example: float) -> None:
    import json

    from hm_recsys.config import Settings

    with tempfile.TemporaryDirectory(prefix="bench-train-") as home:
        settings = Settings.from_env({"HM_RECSYS_HOME": home})
        res = T.run_training(settings, config, run_name="bench", progress=False, warehouse=warehouse)
        bundle_mb = sum(f.stat().st_size for f in res.bundle_dir.rglob("*") if f.is_file()) / 2**20
        epochs = json.loads((res.bundle_dir / "metrics.json").read_text())["epochs"]
    print(res.table)
    examples = sum(e["examples_per_second"] * e["seconds"] for e in epochs)
    bound = examples * flops_per_example / gemm
    sec = res.seconds
    print(f"\nfull weekly retrain ({res.split.describe()}): {sec['total']:,.0f} s wall")
    print(f"  prepare  {sec['prepare']:8,.0f} s  (replay the warehouse, weekly shards, fit vocabularies)")
    print(f"  fit      {sec['fit']:8,.0f} s  ({len(epochs)} epochs, {examples:,.0f} examples, best epoch "
          f"{res.best_epoch}; FLOP lower bound {bound:,.0f} s = {sec['fit'] / bound:.1f}x below measured, "
          f"validation scoring included in measured)")
    for e in epochs:
        print(f"    epoch {e['epoch']}: {e['seconds']:6,.0f} s, {e['examples_per_second']:7,.0f} examples/s, "
              f"valid recall@12 {e['valid_recall@12']:.4f}")
    print(f"  evaluate {sec['evaluate']:8,.0f} s  (holdout: model + baselines + oracle)")
    print(f"  log      {sec['log']:8,.0f} s  (bundle {bundle_mb:,.0f} MiB + MLflow params, plots, pyfunc model)")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--dense-steps", type=int, default=8, help="steps of the dense baseline (0 = skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", type=Path, help="TOML schema (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--warehouse", type=Path, help="also time one full retrain on this warehouse")
    p.add_argument("--no-scoring", action="store_true", help="skip scoring every customer (~10-20 s)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="print the torch.profiler table of STEPS more steps (where the time goes)")
    a = p.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    config = T.load_config(a.config, [*a.overrides, f"train.threads={a.threads}"])
    torch.set_num_threads(a.threads)
    print(f"== training throughput at full-scale shapes ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    figs = throughput(config, a.steps, a.dense_steps, a.profile)
    if not a.no_scoring:
        figs.update(scoring(config, figs["gemm_flops"]))
    if a.warehouse:
        print(f"\n== one full retrain: {a.warehouse}")
        full_retrain(a.warehouse, config, figs["gemm_flops"], figs["flops_per_example"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
