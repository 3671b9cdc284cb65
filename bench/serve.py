"""Load benchmark of the recommendation service, against honest baselines on the same served state, in one run.

    .venv/bin/python bench/serve.py                          # trains a small one-epoch champion first (temp home)
    .venv/bin/python bench/serve.py --home DIR               # DIR's champion and its newest published served state
    .venv/bin/python bench/serve.py --duration 5 --soak 30   # short smoke run; --soak 600 is the issue's soak

WHAT RUNS. With ``--home DIR`` the champion of DIR's MLflow registry
(``MLFLOW_TRACKING_URI`` if set, else DIR's sqlite store) and its newest
published served state; nothing in the registry is changed. Without
``--home``, a temporary runtime folder (deleted afterwards) gets ``--scale``
synthetic data (``bench/_datasets``, cached), a one-epoch model with its
fusion (the functions ``hm-recsys train`` runs), registered and promoted, and
its served state as of the week before the newest (``pipeline.publish_state``,
what ``hm-recsys refresh`` runs); the state as of the newest week is published
later, for the reload. In the same run, on the same state files:

* **service**: ``hm-recsys serve`` as users run it (BentoML with the
  service's own settings: one worker, async endpoints, access log, metrics
  and API-route tracing off), except alias polling slowed from 10 s to 600 s
  and an admin token set, so the one reload comes from the benchmark's request;
* **bare FastAPI** (``bench/_baseline_app.py bare``): FastAPI + uvicorn, one
  worker, access log off, async endpoints, loading the state as a service
  worker does (``serving.load_served``) and answering with the same code path
  (``Served.recommend`` -> ``ServedState.recommend_rows``): service / bare is
  what BentoML and the service's shell cost (or save);
* **seed naive** (``bench/_baseline_app.py seed``; ``--no-seed`` skips it):
  the PyTorch seed's way, the customer tower per request and the towers
  alone (different, cheaper lists: no candidate pooling, no fusion);
* ``--stock``: also the service with BentoML's stock access log, metrics,
  tracing and threads (what the service's tuning buys).

Servers start one after the other; each one's start -> ``/readyz`` time and
its process tree's RSS (sampled every second from /proc, all descendants
summed) are reported. Before any load the service's answers are checked
against ``ServedState.predictions`` (what the evaluation scored) and the bare
app's against the service's.

LOAD (wrk and hey, the Debian packages; client and servers share this
machine's cores, which the report says with the load average):

1. Closed loop, ``wrk -t1 -cN -d DURATION`` for N in 1, 8, 32, on
   ``/recommend`` (``top_k`` 12) and on ``/recommend/batch`` (``--batch-size``
   ids a request). The Lua script (``bench/_load.py``) rotates over 2,000
   customer ids, 10% of them unknown (cold start), as real traffic;
   servers take turns at each level so drift hits them alike. p50/p99/p99.9
   are wrk's histogram percentiles; errors = non-2xx + socket errors.
2. Fixed rate at half the service's measured ``/recommend`` throughput at
   concurrency 8 (``--rate`` overrides), the same rate for every server, two
   ways. (a) wrk, the rotating mixed ids, ``-c 64``, paced by the Lua
   script's ``delay()``: one schedule of evenly spaced slots on the monotonic
   clock, each taken by whichever connection is free; slots that found all 64
   busy are reported as late (then the figures stop being open-loop). The
   fixed-rate target is judged on this run. (b) ``hey -z DURATION -c 64 -q
   rate/64``, as the issue asked, with ONE known customer's body (hey sends
   one body; the customer with the median history length of the sample) and
   exact percentiles from its ``-o csv`` rows (which omit socket errors:
   requests the schedule called for but never answered count as errors,
   ``shortfall``). hey's 64 workers' tickers start together and stay in step,
   so it sends bursts of 64 requests every 64/rate s (the CSV's send offsets
   show it: ``burst``), not a steady rate; a one-worker server answers the last
   request of a burst after the other 63, which is what its p99 measures.
   Both tools time a request from its send, so neither counts time a request
   waited for a free connection.
3. Reload under load: wrk at concurrency 8 on the service's ``/recommend``;
   after ``--settle`` s, ``POST /admin/reload`` for a new served state (the
   newest as_of when this run published it; with a champion found in
   ``--home``, a forced reload of the same (version, as_of): the same fetch,
   checksum verification, load, index check and swap, without a download),
   ``/metadata`` polled every 0.1 s until it shows the new state; reload time
   = request -> that answer; failed = non-2xx + socket errors in the window.
4. ``--soak SECONDS`` (off by default; the issue asks 600): paced wrk with
   the mixed ids at the fixed rate on the service, its process tree's RSS
   sampled every 5 s: error rate, and RSS growth from the first to the last
   window's median (windows of 60 s, or a third of a shorter soak);
   anonymous and file-backed RSS apart (touched pages of the memory-mapped
   state count as file-backed: growth there is the mapping warming, not a leak).

Targets (PASS/MISS; exit status 1 if any is missed): ``/recommend`` p99 <= 10
ms at the fixed rate (paced wrk, 0 errors), p99 <= 25 ms at saturation with
concurrency 8, reload <= 30 s with 0 failed requests, soak error rate < 0.1%
and RSS growth < 10%. Everything goes to ``--out`` (JSON; default
``$HM_RECSYS_HOME/bench/serve.json``), with a plot of latency percentiles by
concurrency next to it (``.png``) and the logs (servers, wrk, hey, the Lua
scripts) in ``<out stem>-logs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

from _load import Hey, MemorySampler, Wrk, tree_memory, wrk_version, write_load_script  # noqa: E402

from hm_recsys.procs import free_port, kill_tree  # noqa: E402

# BentoML's own defaults for the settings hm_recsys.service changes (access log, metrics, tracing, threads)
STOCK_BENTOML = {"threads": 1, "logging": {"access": {"enabled": True}}, "metrics": {"enabled": True},
                 "tracing": {"excluded_urls": None}}
TARGETS = {"fixed_rate_p99_ms": 10.0, "saturation_c8_p99_ms": 25.0, "reload_seconds": 30.0,
           "soak_error_rate": 0.001, "soak_rss_growth": 0.10}
ENDPOINTS = ("/recommend", "/recommend/batch")


# ---------------------------------------------------------------------------
# The champion under test
# ---------------------------------------------------------------------------
def train_champion(settings, scale: str, cache: Path, seed: int) -> str:
    """Copy ``scale`` data into the runtime folder, train a one-epoch model with its fusion, register, promote.

    Publishes its served state as of the week BEFORE the newest, so that the
    reload under load can switch to the newest (published later).
    """
    from _datasets import warehouse_for

    from hm_recsys import bundle, pipeline, train
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.registry import Registry

    layout = settings.layout
    t0 = time.perf_counter()
    if not layout.warehouse_dir.exists():
        print(f"{scale} synthetic data (cached in {cache}) -> {layout.warehouse_dir}", flush=True)
        shutil.copytree(warehouse_for(scale, cache, seed=seed), layout.warehouse_dir)
    wh = Warehouse(layout.warehouse_dir)
    config = train.load_config(None, ["train.train_weeks=4", "train.epochs=1", f"train.seed={seed}"])
    split = train.resolve_split(wh, config)
    scratch = layout.runs_dir / "bench-serve-train"
    print(f"training a one-epoch model with its fusion on {split.describe()} ...", flush=True)
    try:
        prep = train.prepare(wh, split, config, scratch / "shards", progress=False)
        model, _, _ = train.fit(prep, config, progress=False)
        fusion = train.fit_fusion(model, prep, config, wh, scratch, "bench-serve", progress=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rec = train.recommender(model, prep, prep.end_history, prep.end_raw)
    full = {"features": config.features.to_dict(), "model": model.config.to_dict(),
            "train": dataclasses.asdict(config.train), "retrieval": config.retrieval.to_dict()}
    bundle_dir = bundle.save(layout.runs_dir / "bench-serve-bundle", rec, full, prep.data_window,
                             {"note": "bench/serve.py model: one epoch, metrics not computed"}, fusion=fusion)
    version = register(settings, bundle_dir)
    shutil.rmtree(bundle_dir, ignore_errors=True)
    pipeline.publish_state(version, pipeline.newest_as_of(wh) - dt.timedelta(weeks=1), settings)
    Registry(settings).promote(version)
    print(f"model version {version} is champion, trained and published in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return version


def register(settings, bundle_dir: Path) -> str:
    """Log ``bundle_dir`` as a run's ``bundle/`` (no pyfunc flavour: the service never reads it) and register it."""
    import mlflow

    from hm_recsys import tracking
    from hm_recsys.registry import BUNDLE_ARTIFACT, Registry

    exp_id = tracking.configure(settings)
    with mlflow.start_run(experiment_id=exp_id, run_name="bench-serve", tags={"stage": "bench-serve-model"}) as run:
        mlflow.log_artifacts(str(bundle_dir), BUNDLE_ARTIFACT)
        mlflow.log_text("bench/serve.py logs no pyfunc model; the service reads bundle/ and served/",
                        "model/MLmodel")
    return Registry(settings).register(run.info.run_id).version


# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------
class Server:
    """One server process on a free 127.0.0.1 port, its own session, its tree's memory sampled every second."""

    def __init__(self, name: str, label: str, cmd: list[str], env: dict[str, str], logs: Path):
        self.name, self.label = name, label
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.env = env
        self.log = logs / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.load_s: float | None = None  # the state's load in the server, from its /metadata
        self.sampler: MemorySampler | None = None
        self.final: dict = {}

    def start(self, timeout: float = 600.0) -> Server:
        import httpx

        self._fh = open(self.log, "wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.sampler = MemorySampler(self.proc.pid, every=1.0).start()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); log:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s; log:\n{self.tail()}")

    def tail(self) -> str:
        self._fh.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.sampler is not None:
            self.sampler.stop()
        if self.proc.poll() is None:
            self.final = tree_memory(self.proc.pid)  # each process's VmHWM, read before they go
        kill_tree(self.proc)
        self._fh.close()

    def memory(self) -> dict:
        peak = self.sampler.peak if self.sampler else {}
        return {"peak_rss_mib": peak.get("rss"), "peak_anon_mib": peak.get("anon"), "peak_file_mib": peak.get("file"),
                "processes": peak.get("processes"), "sum_vmhwm_mib": self.final.get("hwm")}


def get_json(url: str, timeout: float = 10.0) -> dict:
    import httpx

    r = httpx.get(url, timeout=timeout)
    r.raise_for_status()
    return r.json()


def post_json(url: str, body: dict, timeout: float = 30.0) -> dict:
    import httpx

    r = httpx.post(url, json=body, timeout=timeout)
    r.raise_for_status()
    return r.json()


def articles(answer: dict) -> list[str]:
    return [r["article_id"] for r in answer["recommendations"]]


# ---------------------------------------------------------------------------
# Load phases
# ---------------------------------------------------------------------------
def closed_loop(servers: list[Server], scripts: dict[str, Path], levels: list[int], seconds: int, logs: Path,
                batch: int) -> dict:
    """``{endpoint: {conc: {server: wrk figures}}}``; servers take turns at each level."""
    out: dict = {}
    for ep in ENDPOINTS:
        out[ep] = {}
        for c in levels:
            out[ep][c] = {}
            for s in servers:
                r = Wrk(s.url, scripts[ep], 1, c, logs / "wrk.log").run(seconds)
                if ep == "/recommend/batch":
                    r["customers_per_s"] = r["rps"] * batch
                out[ep][c][s.name] = r
                print(f"  {ep:<17} conc {c:>3}  {s.label:<22} {r['rps']:>8.0f} req/s  p99 {r['p99_ms']:>7.2f} ms  "
                      f"errors {r['failed']}", flush=True)
    return out


def fixed_rate(servers: list[Server], rate: float, hey_body: Path, paced: Path, workers: int, seconds: int,
               logs: Path) -> dict:
    """``{server: {"hey": figures, "wrk_paced": figures}}`` at ``rate`` requests/s."""
    out = {}
    for s in servers:
        h = Hey(f"{s.url}/recommend", hey_body, workers, rate, logs / "hey.log").run(seconds,
                                                                                    logs / f"hey-{s.name}.csv")
        w = Wrk(s.url, paced, 1, workers, logs / "wrk.log").run(seconds)
        out[s.name] = {"hey": h, "wrk_paced": w}
        print(f"  fixed {rate:.0f}/s  {s.label:<22} hey p99 {h['p99_ms']:>7.2f} ms ({h['rps']:.0f}/s, "
              f"non-2xx {h['non_2xx']}, short {h['shortfall']}, bursts of {h['burst_median']:.0f}); "
              f"paced wrk p99 {w['p99_ms']:>7.2f} ms ({w['rps']:.0f}/s, errors "
              f"{w['failed']}, late {w['late']})", flush=True)
    return out


def reload_under_load(svc: Server, token: str, script: Path, conc: int, settle: float, force: bool,
                      want_as_of: str, logs: Path, timeout: float = 300.0) -> dict:
    """wrk at ``conc`` on the service; POST /admin/reload; poll /metadata until it shows the new state."""
    import httpx

    before = get_json(f"{svc.url}/metadata")
    last0 = (before.get("reloader") or {}).get("last")
    wrk = Wrk(svc.url, script, 1, conc, logs / "wrk.log")
    polls = 0
    try:
        wrk.start()
        time.sleep(settle)
        t0 = time.perf_counter()
        r = httpx.post(f"{svc.url}/admin/reload", json={"force": force},
                       headers={"Authorization": f"Bearer {token}"}, timeout=10)
        if r.status_code != 202:
            raise RuntimeError(f"/admin/reload answered {r.status_code}: {r.text[:300]}")
        while True:
            meta = get_json(f"{svc.url}/metadata")
            polls += 1
            last = (meta.get("reloader") or {}).get("last") or {}
            if last != last0 and last.get("status") == "swapped" and meta.get("as_of") == want_as_of:
                reload_s = time.perf_counter() - t0
                break
            if last != last0 and last.get("status") == "failed":
                raise RuntimeError(f"the reload failed: {last}")
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"no new state after {timeout:.0f} s: {meta.get('reloader')}")
            time.sleep(0.1)
        time.sleep(settle)
        load = wrk.stop()
    finally:
        wrk.kill()
    after = post_json(f"{svc.url}/recommend", {"customer_id": "0" * 64, "top_k": 12})
    return {"kind": "forced reload of the same (version, as_of)" if force else "switch to a newer as_of",
            "from": f"{before['model_version']}@{before['as_of']}", "to": f"{meta['model_version']}@{meta['as_of']}",
            "reload_seconds": round(reload_s, 2), "service_load_seconds": last.get("seconds"),
            "metadata_polls": polls, "answers_as_of_after": after.get("as_of"), "load": load}


def soak(svc: Server, script: Path, seconds: int, workers: int, logs: Path) -> dict:
    sampler = MemorySampler(svc.proc.pid, every=5.0).start()
    try:
        load = Wrk(svc.url, script, 1, workers, logs / "wrk.log").run(seconds)
    finally:
        sampler.stop()
    sampler.sample()
    s = sampler.samples
    window = min(60.0, seconds / 3)
    t_end = s[-1]["t"]
    first = [m for m in s if m["t"] <= window]
    last = [m for m in s if m["t"] >= t_end - window]

    def growth(key: str) -> float:
        a, b = np.median([m[key] for m in first]), np.median([m[key] for m in last])
        return float(b / a - 1) if a > 0 else float("nan")

    error_rate = load["failed"] / max(load["requests"] + load["socket_errors"], 1)
    return {"seconds": seconds, "window_seconds": round(window, 1), "load": load, "error_rate": error_rate,
            "rss_first_mib": float(np.median([m["rss"] for m in first])),
            "rss_last_mib": float(np.median([m["rss"] for m in last])), "rss_growth": growth("rss"),
            "anon_growth": growth("anon"), "file_growth": growth("file"),
            "samples": [{k: round(v, 1) for k, v in m.items()} for m in s]}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def loop_table(res: dict, servers: list[Server], ep: str, title: str) -> str:
    batch = ep == "/recommend/batch"
    hdr = (f"{'conc':>4}  {'server':<24}{'req/s':>9}" + (f"{'cust/s':>9}" if batch else "")
           + f"{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'max ms':>9}{'errors':>8}")
    lines = [title, hdr, "-" * len(hdr)]
    for c, row in res[ep].items():
        for s in servers:
            r = row[s.name]
            lines.append(f"{c:>4}  {s.label:<24}{r['rps']:>9.0f}" + (f"{r['customers_per_s']:>9.0f}" if batch else "")
                         + f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['p999_ms']:>10.2f}{r['max_ms']:>9.1f}"
                         f"{r['failed']:>8}")
        if "bare" in row:
            s, b = row["service"], row["bare"]
            lines.append(f"{'':>4}  {'service / bare fastapi':<24}{s['rps'] / b['rps']:>8.2f}x"
                         + (f"{'':>9}" if batch else "") + f"{'':>9}{s['p99_ms'] / b['p99_ms']:>8.2f}x")
    return "\n".join(lines)


def rate_table(res: dict, servers: list[Server], rate: float, title: str) -> str:
    hdr = (f"{'tool':<24}{'server':<24}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'max ms':>9}"
           f"{'errors':>8}{'late/short':>11}{'burst':>7}")
    lines = [title, hdr, "-" * len(hdr)]
    for tool, name in (("wrk_paced", "wrk paced (mixed ids)"), ("hey", "hey (1 known customer)")):
        for s in servers:
            r = res[s.name][tool]
            hey = tool == "hey"
            burst = f"{r['burst_median']:.0f}" if hey else "-"
            errors = r["non_2xx"] if hey else r["failed"]
            lines.append(f"{name:<24}{s.label:<24}{r['rps']:>8.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                         f"{r['p999_ms']:>10.2f}{r['max_ms']:>9.1f}{errors:>8}{r['shortfall' if hey else 'late']:>11}"
                         f"{burst:>7}")
        if "bare" in res:
            s, b = res["service"][tool], res["bare"][tool]
            lines.append(f"{'':<24}{'service / bare fastapi':<24}{s['rps'] / b['rps']:>7.2f}x{'':>9}"
                         f"{s['p99_ms'] / b['p99_ms']:>8.2f}x")
    lines.append("errors: non-2xx (+ socket errors for wrk); late: schedule slots that found every connection busy "
                 "(paced wrk); short: requests hey's schedule called for but did not get answered (socket errors, "
                 "or ticks dropped while its worker waited); burst: how many requests hey sent at once with the "
                 "median request (its workers' tickers fire together)")
    return "\n".join(lines)


def plot(res: dict, servers: list[Server], path: Path, title: str) -> Path | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    styles = {"p50_ms": ("p50", "o", ":"), "p99_ms": ("p99", "s", "-"), "p999_ms": ("p99.9", "^", "--")}
    colors = {"service": "C0", "bare": "C1", "seed": "C2", "stock": "C3"}
    for i, ep in enumerate(ENDPOINTS):
        ax = fig.add_subplot(1, 2, i + 1)
        levels = list(res[ep])
        for s in servers:
            if s.name not in ("service", "bare"):
                continue
            for key, (name, marker, ls) in styles.items():
                ax.plot(levels, [res[ep][c][s.name][key] for c in levels], marker=marker, linestyle=ls,
                        color=colors.get(s.name), label=f"{s.label} {name}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent connections (wrk, closed loop)")
        ax.set_ylabel("latency, ms")
        ax.set_title(ep)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, format="png")
    return path


def verdict(ok: bool | None) -> str:
    return "not run" if ok is None else "PASS" if ok else "MISS"


# ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, help="runtime folder whose champion to serve (trained into it if it has "
                                             "none); default: a temporary folder, deleted afterwards")
    p.add_argument("--scale", default="small", choices=["tiny", "small"], help="synthetic data when training")
    p.add_argument("--cache", type=Path, help="where synthetic data is made once (default $HM_RECSYS_HOME/bench-data)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, help="JSON report (default $HM_RECSYS_HOME/bench/serve.json); the plot "
                                            "and <stem>-logs/ go next to it")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="closed-loop levels")
    p.add_argument("--duration", type=int, default=15, help="seconds per measured run (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured seconds per server and endpoint first")
    p.add_argument("--batch-size", type=int, default=32, help="customer ids per /recommend/batch request")
    p.add_argument("--top-k", type=int, default=12)
    p.add_argument("--ids", type=int, default=2000, help="customer ids the load rotates over")
    p.add_argument("--unknown-share", type=float, default=0.1, help="share of those ids that are unknown")
    p.add_argument("--rate", type=float, help="fixed rate, requests/s (default: half the service's /recommend "
                                              "throughput at concurrency 8)")
    p.add_argument("--rate-connections", type=int, default=64, help="hey workers / paced wrk connections")
    p.add_argument("--reload-concurrency", type=int, default=8)
    p.add_argument("--settle", type=float, default=2.0, help="seconds of load before and after the reload")
    p.add_argument("--soak", type=int, default=0, help="soak seconds at the fixed rate (default 0: off)")
    p.add_argument("--workers", type=int, help="service workers (default: the service's own, 1)")
    p.add_argument("--no-seed", action="store_true", help="skip the seed-style naive baseline")
    p.add_argument("--stock", action="store_true", help="also the service with BentoML's stock log/metrics/tracing")
    a = p.parse_args(argv)
    if a.duration < 1 or a.batch_size < 1 or not 0 <= a.unknown_share < 1:
        p.error("need --duration >= 1, --batch-size >= 1, 0 <= --unknown-share < 1")
    for tool in ("wrk", "hey"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed: apt-get install -y wrk hey")

    from hm_recsys.config import Settings

    caller_home = Settings.from_env().home
    out = (a.out or caller_home / "bench" / "serve.json").resolve()
    cache = (a.cache or caller_home / "bench-data").resolve()
    logs = out.parent / f"{out.stem}-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)

    temp = a.home is None
    home = Path(tempfile.mkdtemp(prefix="hm-bench-serve-")) if temp else a.home.resolve()
    # a temporary home owns its registry; --home DIR honours MLFLOW_TRACKING_URI / HM_RECSYS_DATA_ROOT if set
    drop = ("HM_RECSYS_", "MLFLOW_", "BENTOML_HOME") if temp else ("HM_RECSYS_HOME", "HM_RECSYS_SERVE_",
                                                                     "HM_RECSYS_ADMIN_TOKEN", "BENTOML_HOME")
    for k in [k for k in os.environ if k.startswith(drop)]:
        del os.environ[k]
    token = secrets.token_hex(16)
    os.environ.update({"HM_RECSYS_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true",
                       "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "1",
                       "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "GLOG_minloglevel": "2"})
    settings = Settings.from_env()
    servers: list[Server] = []
    t_start = time.perf_counter()
    try:
        from hm_recsys import pipeline
        from hm_recsys.data.warehouse import Warehouse
        from hm_recsys.registry import CHAMPION, Registry
        from hm_recsys.served import ServedState, read_manifest
        from hm_recsys.serving import serve_env

        reg = Registry(settings)
        champion = reg.get(CHAMPION)
        trained_here = champion is None
        version = train_champion(settings, a.scale, cache, a.seed) if trained_here else champion.version
        files = reg.fetch_state(version)
        state = ServedState.load(files.state_dir, expected_version=version, verify=False)
        m = read_manifest(files.state_dir)
        sc = m["index"]["scann_config"]
        scale = {"model_version": version, "as_of": m["as_of"], "customers": m["n_customers"],
                 "customers_with_history": m.get("n_customers_with_history"), "articles": m["n_articles"],
                 "recommendable_articles": m.get("n_recommendable_articles"), "dim": m["dim"],
                 "sources": list(m["retrieval"].get("sources", [])),
                 "index": "brute force" if sc.get("brute_force") else
                 f"{sc.get('num_leaves')} leaves, search {sc.get('leaves_to_search')}",
                 "home": "temporary (trained here)" if temp else str(home),
                 "champion": "trained by this run" if trained_here else "found in the registry"}
        print(f"champion v{version}: served state as of {m['as_of']}: {m['n_customers']:,} customers, "
              f"{m['n_articles']:,} articles ({scale['recommendable_articles']:,} recommendable), dim {m['dim']}, "
              f"sources {', '.join(scale['sources'])}; ScaNN {scale['index']}", flush=True)

        # the requests: ids rotating, a share unknown; hey's one body: a known customer with a median history
        rng = np.random.default_rng(a.seed)
        n_unknown = int(round(a.ids * a.unknown_share))
        known_all = state.customer_index
        known = [str(known_all[i]) for i in rng.choice(len(known_all), size=min(a.ids - n_unknown, len(known_all)),
                                                       replace=False)]
        unknown = [rng.bytes(32).hex() for _ in range(n_unknown)]
        ids = known + unknown
        rng.shuffle(ids)
        hist = np.array([state.history.items(int(r)).size for r in state.rows_of(known)])
        order = np.argsort(hist, kind="stable")
        hey_customer = known[int(order[len(order) // 2])]
        hey_body = logs / "hey_body.json"
        hey_body.write_text(json.dumps({"customer_id": hey_customer, "top_k": a.top_k}))
        scripts = {"/recommend": write_load_script(logs / "recommend.lua", ids, a.top_k),
                   "/recommend/batch": write_load_script(logs / "batch.lua", ids, a.top_k, "/recommend/batch",
                                                         batch=a.batch_size)}

        # the servers, one after the other
        base = {k: v for k, v in os.environ.items()}
        env = serve_env(settings, a.workers, base=base, HM_RECSYS_SERVE_POLL_SECONDS="600",
                        HM_RECSYS_ADMIN_TOKEN=token)
        serve_cmd = [sys.executable, "-m", "hm_recsys.cli", "serve", "--host", "127.0.0.1", "--port", "{port}"]
        servers.append(Server("service", "bentoml service", serve_cmd, env, logs))
        for mode, label, skip in (("bare", "bare fastapi", False), ("seed", "seed naive (tower/req)", a.no_seed)):
            if not skip:
                servers.append(Server(mode, label, [sys.executable, str(BENCH / "_baseline_app.py"), mode, "--bundle",
                                                    str(files.bundle_dir), "--state", str(files.state_dir),
                                                    "--version", version, "--port", "{port}"], env, logs))
        if a.stock:
            servers.append(Server("stock", "bentoml, stock config", serve_cmd,
                                  serve_env(settings, a.workers, base=env, bentoml_config=STOCK_BENTOML), logs))
        for s in servers:
            s.start()
            s.load_s = get_json(f"{s.url}/metadata").get("load_seconds")
            print(f"{s.label}: pid {s.proc.pid}, ready {s.startup_s:.1f} s after start, state loaded in "
                  f"{fmt(s.load_s)} s ({s.url})", flush=True)
        svc = servers[0]
        meta = get_json(f"{svc.url}/metadata")
        if (meta["model_version"], meta["as_of"]) != (version, m["as_of"]):
            raise SystemExit(f"the service serves {meta['model_version']}@{meta['as_of']}, not {version}@{m['as_of']}")

        # answers: the service = the evaluation's; bare = the service; batch = singles
        sample = known[:50]
        want = state.predictions(sample, k=a.top_k)
        svc_ans = {c: articles(post_json(f"{svc.url}/recommend", {"customer_id": c, "top_k": a.top_k}))
                   for c in sample + unknown[:10]}
        parity = {"service_vs_evaluation": f"{sum(svc_ans[c] == want[c] for c in sample)}/{len(sample)}"}
        if any(s.name == "bare" for s in servers):
            bare = next(s for s in servers if s.name == "bare")
            same = sum(articles(post_json(f"{bare.url}/recommend", {"customer_id": c, "top_k": a.top_k})) == v
                       for c, v in svc_ans.items())
            parity["bare_vs_service"] = f"{same}/{len(svc_ans)}"
        batch_ids = (sample + unknown[:10])[:a.batch_size]
        got = post_json(f"{svc.url}/recommend/batch", {"customer_ids": batch_ids, "top_k": a.top_k})["results"]
        parity["service_batch_vs_single"] = f"{sum(articles(r) == svc_ans[c] for c, r in zip(batch_ids, got))}/" \
                                            f"{len(batch_ids)}"
        print("answers: " + ", ".join(f"{k} {v}" for k, v in parity.items()), flush=True)

        cores, load0 = os.cpu_count(), os.getloadavg()
        print(f"\n{cores} CPU cores shared by the client (wrk/hey) and {len(servers)} servers; load average "
              f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at the start of the load", flush=True)
        if a.warmup:
            for s in servers:
                for ep in ENDPOINTS:
                    Wrk(s.url, scripts[ep], 1, 8, logs / "wrk.log").run(a.warmup)

        # 1. closed loop
        loop = closed_loop(servers, scripts, a.concurrency, a.duration, logs, a.batch_size)
        # 2. fixed rate: half the service's /recommend saturation at concurrency 8
        c_ref = min(a.concurrency, key=lambda c: abs(c - 8))
        sat = loop["/recommend"][c_ref]["service"]["rps"]
        rate = a.rate or 0.5 * sat
        paced = write_load_script(logs / "recommend_paced.lua", ids, a.top_k, rate=rate)
        fixed = fixed_rate(servers, rate, hey_body, paced, a.rate_connections, a.duration, logs)
        # 3. reload under load
        if trained_here:
            newest = pipeline.newest_as_of(Warehouse(settings.layout.warehouse_dir)).isoformat()
            if newest > m["as_of"]:
                print(f"publishing the served state as of {newest} (before the load window) ...", flush=True)
                pipeline.publish_state(version, dt.date.fromisoformat(newest), settings)
            force, want_as_of = newest <= m["as_of"], max(newest, m["as_of"])
        else:
            force, want_as_of = True, m["as_of"]
        reload = reload_under_load(svc, token, scripts["/recommend"], a.reload_concurrency, a.settle, force,
                                   want_as_of, logs)
        rl = reload["load"]
        print(f"  reload ({reload['kind']}) {reload['from']} -> {reload['to']}: {reload['reload_seconds']:.2f} s "
              f"to /metadata; {rl['requests']:,} requests in the window, {rl['failed']} failed", flush=True)
        # 4. soak
        soaked = None
        if a.soak:
            print(f"soak: {a.soak} s at {rate:.0f} req/s ...", flush=True)
            soaked = soak(svc, paced, a.soak, a.rate_connections, logs)
        load1 = os.getloadavg()
    finally:
        for s in servers:
            s.stop()
        if temp:
            shutil.rmtree(home, ignore_errors=True)

    # -- the report ---------------------------------------------------------------------------
    desc = (f"{scale['customers']:,} customers, {scale['articles']:,} articles, model v{version} as of "
            f"{scale['as_of']}; {len(ids):,} rotating ids, {n_unknown} unknown; top_k {a.top_k}")
    where = f"{cores} cores shared by client and servers, load average {load0[0]:.2f} at start, {load1[0]:.2f} at end"
    texts = [f"SCALE: {desc}; {where}",
             loop_table(loop, servers, "/recommend", f"\n/recommend, closed loop: wrk -t1 -cN, {a.duration} s each"),
             loop_table(loop, servers, "/recommend/batch",
                        f"\n/recommend/batch ({a.batch_size} ids a request), closed loop: wrk -t1 -cN, "
                        f"{a.duration} s each"),
             rate_table(fixed, servers, rate,
                        f"\n/recommend at a fixed {rate:.0f} req/s (half the service's {sat:.0f} req/s at conc "
                        f"{c_ref}), {a.rate_connections} connections, {a.duration} s each; hey customer "
                        f"{hey_customer[:12]}... ({int(hist[order[len(order) // 2]])} articles of history)")]
    mem_hdr = (f"{'server':<24}{'ready s':>9}{'load s':>8}{'peak RSS MiB':>14}{'anon':>8}{'file':>8}{'procs':>7}"
               f"{'sum VmHWM':>11}")
    mem = ["\nSERVERS (ready: start -> /readyz 200; load: the state's load + checks inside the server, from its "
           "/metadata; RSS: the process tree's, sampled every second; sum VmHWM: each process's own peak, summed)",
           mem_hdr, "-" * len(mem_hdr)]
    for s in servers:
        mm = s.memory()
        mem.append(f"{s.label:<24}{s.startup_s:>9.1f}{fmt(s.load_s, '.1f'):>8}{fmt(mm['peak_rss_mib'], '.0f'):>14}"
                   f"{fmt(mm['peak_anon_mib'], '.0f'):>8}{fmt(mm['peak_file_mib'], '.0f'):>8}"
                   f"{mm['processes'] or '-':>7}{fmt(mm['sum_vmhwm_mib'], '.0f'):>11}")
    texts.append("\n".join(mem))
    texts.append(f"\nRELOAD under load (wrk -t1 -c{a.reload_concurrency} on /recommend, {a.settle:g} s before and "
                 f"after): {reload['kind']} {reload['from']} -> {reload['to']}: {reload['reload_seconds']:.2f} s from "
                 f"POST /admin/reload to /metadata showing it (the worker's own load "
                 f"{fmt(reload['service_load_seconds'])}"
                 f" s); window {rl['seconds']:.1f} s, {rl['requests']:,} requests, {rl['failed']} failed "
                 f"({rl['non_2xx']} non-2xx, {rl['socket_errors']} socket errors), p50 {rl['p50_ms']:.2f} ms, p99 "
                 f"{rl['p99_ms']:.2f} ms, max {rl['max_ms']:.1f} ms; answers after: as of "
                 f"{reload['answers_as_of_after']}")
    if soaked:
        sl = soaked["load"]
        texts.append(f"\nSOAK {a.soak} s at {rate:.0f} req/s (paced wrk, mixed ids, {a.rate_connections} connections): "
                     f"{sl['requests']:,} requests ({sl['rps']:.0f}/s), {sl['failed']} failed (error rate "
                     f"{soaked['error_rate']:.4%}), p50 {sl['p50_ms']:.2f} ms, p99 {sl['p99_ms']:.2f} ms, p99.9 "
                     f"{sl['p999_ms']:.2f} ms, late slots {sl['late']}; service RSS median of the first "
                     f"{soaked['window_seconds']:g} s {soaked['rss_first_mib']:.0f} MiB -> last "
                     f"{soaked['window_seconds']:g} s {soaked['rss_last_mib']:.0f} MiB ({soaked['rss_growth']:+.1%}; "
                     f"anonymous {soaked['anon_growth']:+.1%}, file-backed {soaked['file_growth']:+.1%})")
    svc_fixed = fixed["service"]
    p99_fixed = svc_fixed["wrk_paced"]["p99_ms"]
    p99_c8 = loop["/recommend"][c_ref]["service"]["p99_ms"]
    checks = [
        (f"/recommend p99 <= {TARGETS['fixed_rate_p99_ms']:g} ms at the fixed rate of half saturation",
         p99_fixed <= TARGETS["fixed_rate_p99_ms"] and svc_fixed["wrk_paced"]["failed"] == 0,
         f"paced wrk {p99_fixed:.2f} ms at {rate:.0f} req/s, {svc_fixed['wrk_paced']['late']} late slots (hey: "
         f"{svc_fixed['hey']['p99_ms']:.2f} ms, bursts of {svc_fixed['hey']['burst_median']:.0f} requests, "
         f"not a steady rate)"),
        (f"/recommend p99 <= {TARGETS['saturation_c8_p99_ms']:g} ms at saturation, concurrency {c_ref}",
         p99_c8 <= TARGETS["saturation_c8_p99_ms"], f"{p99_c8:.2f} ms at {sat:.0f} req/s"),
        (f"reload <= {TARGETS['reload_seconds']:g} s under load with 0 failed requests",
         reload["reload_seconds"] <= TARGETS["reload_seconds"] and rl["failed"] == 0,
         f"{reload['reload_seconds']:.2f} s, {rl['failed']} failed"),
        (f"soak error rate < {TARGETS['soak_error_rate']:.1%} and RSS growth < {TARGETS['soak_rss_growth']:.0%}",
         None if not soaked else soaked["error_rate"] < TARGETS["soak_error_rate"]
         and soaked["rss_growth"] < TARGETS["soak_rss_growth"],
         "--soak SECONDS to run it" if not soaked else
         f"{soaked['error_rate']:.4%}, {soaked['rss_growth']:+.1%} over {a.soak} s"
         + (" (shorter than the issue's 600 s)" if a.soak < 600 else "")),
    ]
    texts.append("\nTARGETS\n" + "\n".join(f"  {verdict(ok):<8}{name}: {detail}" for name, ok, detail in checks))
    png = plot(loop, servers, out.with_suffix(".png"), f"closed-loop latency by concurrency; {desc}")
    report = {
        "scale": scale, "cpu_cores": cores, "load_average_start": load0, "load_average_end": load1,
        "shared_cores": "client (wrk/hey) and all servers run on the same cores",
        "tools": {"wrk": wrk_version(), "hey": "hey (Debian package), -o csv"},
        "requests": {"ids": len(ids), "unknown": n_unknown, "top_k": a.top_k, "batch_size": a.batch_size,
                     "hey_customer": hey_customer},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "servers": {s.name: {"label": s.label, "startup_seconds": round(s.startup_s, 2), "state_load_seconds": s.load_s,
                             **s.memory()}
                    for s in servers},
        "parity": parity, "closed_loop": {ep: {str(c): v for c, v in r.items()} for ep, r in loop.items()},
        "saturation_rps": sat, "saturation_concurrency": c_ref, "fixed_rate": {"rate": rate, "results": fixed},
        "reload": reload, "soak": soaked, "targets": TARGETS,
        "verdicts": [{"target": n, "result": verdict(ok), "detail": d} for n, ok, d in checks],
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = "\n".join(texts)
    out.with_suffix(".txt").write_text(text + "\n")
    print("\n" + text)
    print(f"\nwritten: {out}, {out.with_suffix('.txt')}" + (f", {png}" if png else "") + f"; logs in {logs}")
    return 0 if all(ok is not False for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
