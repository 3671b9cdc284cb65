"""Load benchmark: the BentoML recommendation service vs a bare FastAPI + ScaNN app.

One command::

    .venv/bin/python bench/serve.py                 # small synthetic data, model trained once
    .venv/bin/python bench/serve.py --home /tmp/b   # keep (and reuse) the model between runs

It starts, in the same run and on the same model version:

* the real service (``hm-recsys serve``: BentoML, tuned: one worker, async
  endpoints, precomputed customer embeddings, access log and metrics off);
* the same service with BentoML's stock access log, metrics, tracing and
  threads (``--no-stock`` skips it): what the tuning buys;
* the baseline: a bare FastAPI app served by uvicorn (one worker, access log
  off) implementing the PyTorch seed's ``/recommend`` the naive way: a sync
  endpoint that runs the customer tower for every request, then searches the
  same ScaNN index.

Both get the same requests (90% known customers, 10% unknown, ``top_k=12``)
from a minimal keep-alive HTTP/1.1 client (asyncio + uvloop, one connection
per concurrent user) at concurrency 1, 8 and 32, and the script prints p50/p99
latency and requests/s for each, their ratios, and the targets: the service's
requests/s >= the baseline's, and its p99 < 20 ms at concurrency 8. Before the
load, it checks that the service answers exactly what the evaluation scored
(``ServedState.predictions``) for known customers. The service ranks pooled
candidates with the fusion; the baseline ranks by the towers alone, so the
service does more work per request than before the fusion existed.

Everything (client and both servers) shares this machine's cores, so the
absolute figures depend on what else runs; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hm_recsys.procs import free_port, kill_tree

# BentoML's own defaults for the settings hm_recsys.service changes (access log, metrics, tracing, threads)
STOCK_BENTOML = {"threads": 1, "logging": {"access": {"enabled": True}}, "metrics": {"enabled": True},
                 "tracing": {"excluded_urls": None}}


# ---------------------------------------------------------------------------
# The model under test
# ---------------------------------------------------------------------------
def ensure_model(home: Path, scale: str, seed: int) -> str:
    """The champion of ``home``'s registry; trains and publishes one on synthetic data if there is none."""
    from hm_recsys.config import Settings
    from hm_recsys.registry import Registry

    settings = Settings.from_env({"HM_RECSYS_HOME": str(home)})
    reg = Registry(settings)
    champion = reg.get("champion")
    if champion is not None:
        return champion.version

    from hm_recsys import bundle, train
    from hm_recsys.data.ingest import ingest_history
    from hm_recsys.data.synthetic import generate
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.split import Split

    layout = settings.layout
    t0 = time.perf_counter()
    if not layout.warehouse_dir.exists():
        print(f"generating {scale} synthetic data and ingesting it into {layout.warehouse_dir} ...", flush=True)
        generate(layout.raw_dir, scale=scale, seed=seed, progress=True)
        ingest_history(layout.raw_dir, layout.warehouse_dir, progress=True)
    wh = Warehouse(layout.warehouse_dir)
    config = train.load_config(None, ["train.train_weeks=4", "train.epochs=1", f"train.seed={seed}"])
    split = Split.from_warehouse(wh, train_weeks=config.train.train_weeks)
    print(f"training a one-epoch model on {split.describe()} ...", flush=True)
    prep = train.prepare(wh, split, config, layout.runs_dir / "bench-serve-scratch", progress=True)
    model, _, _ = train.fit(prep, config, progress=True)
    shutil.rmtree(layout.runs_dir / "bench-serve-scratch", ignore_errors=True)
    rec = train.recommender(model, prep, prep.end_history, prep.end_raw)
    full = {"features": config.features.to_dict(), "model": model.config.to_dict(),
            "train": dataclasses.asdict(config.train)}
    bundle_dir = bundle.save(layout.runs_dir / "bench-serve-bundle", rec, full, prep.data_window,
                             {"note": "bench/serve.py model: one epoch, metrics not computed"})
    version = publish(settings, bundle_dir)
    reg.promote(version)
    print(f"model version {version} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return version


def publish(settings, bundle_dir: Path) -> str:
    """Register ``bundle_dir`` as a version and publish its served state as of the newest week, as deploy does."""
    import mlflow

    from hm_recsys import bundle
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.pipeline import newest_as_of
    from hm_recsys.registry import BUNDLE_ARTIFACT, Registry
    from hm_recsys.served import build_state

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    exp = mlflow.get_experiment_by_name(settings.experiment_name)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(
        settings.experiment_name, artifact_location=settings.mlflow_artifact_root.as_uri())
    with mlflow.start_run(experiment_id=exp_id, run_name="bench-serve") as run:
        mlflow.log_artifacts(str(bundle_dir), BUNDLE_ARTIFACT)
        mlflow.log_text("bench model: no pyfunc flavour", "model/MLmodel")
    reg = Registry(settings)
    version = reg.register(run.info.run_id).version
    wh = Warehouse(settings.layout.warehouse_dir)
    as_of = newest_as_of(wh)
    config, fusion = bundle.retrieval(bundle_dir)
    out = settings.layout.state_dir(version, as_of.isoformat())
    build_state(bundle.load(bundle_dir), wh, as_of, version, out, config, fusion)
    reg.publish_state(version, out)
    return version


# ---------------------------------------------------------------------------
# The baseline: the seed's /recommend, the naive way
# ---------------------------------------------------------------------------
def baseline_app(bundle_dir: Path, index_dir: Path, version: str):
    from fastapi import FastAPI
    from pydantic import BaseModel

    from hm_recsys import bundle
    from hm_recsys.index import load_index

    rec = bundle.load(bundle_dir)
    index, _ = load_index(index_dir, expected_model_version=version, expected_dim=rec.dim)
    app = FastAPI()

    class RecommendRequest(BaseModel):
        customer_id: str
        top_k: int = 12
        exclude_purchased: bool = False

    def recommend(req):
        q = rec.customer_embeddings([req.customer_id])  # the customer tower, per request
        rows, scores = index.search(q, req.top_k)
        recs = [{"article_id": index.article_ids[r], "score": float(s), "rank": i}
                for i, (r, s) in enumerate(zip(rows[0].tolist(), scores[0].tolist()), start=1)]
        return {"customer_id": req.customer_id, "recommendations": recs, "count": len(recs)}

    # the annotation is set here because this module's annotations are strings FastAPI cannot resolve
    recommend.__annotations__ = {"req": RecommendRequest}
    app.post("/recommend")(recommend)

    @app.get("/readyz")
    def readyz():
        return {"ok": True}

    return app


def run_baseline(a: argparse.Namespace) -> int:
    import uvicorn

    app = baseline_app(Path(a.bundle), Path(a.index), a.version)
    uvicorn.run(app, host="127.0.0.1", port=a.port, access_log=False, log_level="warning")
    return 0


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------
class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path):
        self.name, self.log = name, log
        self._fh = open(log, "wb")
        self.p = subprocess.Popen(cmd, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, url: str, timeout: float = 300.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.p.returncode}); log:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout} s; log:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        kill_tree(self.p)
        self._fh.close()


# ---------------------------------------------------------------------------
# The load: a minimal keep-alive HTTP/1.1 client
# ---------------------------------------------------------------------------
def request_bytes(port: int, body: bytes) -> bytes:
    return (f"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> tuple[int, bytes]:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    if length is None:
        raise RuntimeError("response without Content-Length")
    return status, await reader.readexactly(length)


async def _load(port: int, reqs: list[bytes], concurrency: int, seconds: float, warmup: int):
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(concurrency)]
    for i in range(warmup):
        await _one(*conns[i % concurrency], reqs[i % len(reqs)])
    latencies: list[float] = []
    errors = 0
    counter = iter(range(10**9))
    t_end = time.perf_counter() + seconds

    async def user(reader, writer):
        nonlocal errors
        while time.perf_counter() < t_end:
            req = reqs[next(counter) % len(reqs)]
            t0 = time.perf_counter()
            try:
                status, _ = await _one(reader, writer, req)
            except (OSError, asyncio.IncompleteReadError, RuntimeError):
                errors += 1
                return
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(user(r, w) for r, w in conns))
    wall = time.perf_counter() - t0
    for _, w in conns:
        w.close()
    lat = np.asarray(latencies) * 1000
    return {"requests": len(lat), "rps": len(lat) / wall, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "errors": errors}


def run_load(port: int, bodies: list[bytes], concurrency: int, seconds: float, warmup: int) -> dict:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    reqs = [request_bytes(port, b) for b in bodies]
    return runner(_load(port, reqs, concurrency, seconds, warmup))


def post(port: int, body: bytes) -> dict:
    import urllib.request

    r = urllib.request.Request(f"http://127.0.0.1:{port}/recommend", data=body,
                               headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=10) as resp:
        return json.loads(resp.read())


# ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, help="runtime folder with (or to get) a champion; default: a temporary "
                                             "folder, deleted afterwards")
    p.add_argument("--scale", default="small", choices=["tiny", "small"], help="synthetic data when no champion")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per (server, concurrency)")
    p.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    p.add_argument("--workers", type=int, default=None, help="service workers (default: the service's own, 1)")
    p.add_argument("--unknown-share", type=float, default=0.1, help="share of requests for unknown customers")
    p.add_argument("--no-stock", action="store_true",
                   help="skip the third server (the service with BentoML's stock logging/metrics/tracing)")
    # internal: the baseline server process
    p.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    p.add_argument("--index", help=argparse.SUPPRESS)
    p.add_argument("--version", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve_baseline:
        return run_baseline(a)

    for k, v in {"MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "1",
                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
        os.environ.setdefault(k, v)
    temp = a.home is None
    home = Path(tempfile.mkdtemp(prefix="hm-bench-serve-")) if temp else a.home.resolve()
    procs: list[Proc] = []
    try:
        version = ensure_model(home, a.scale, a.seed)
        from hm_recsys.config import Settings
        from hm_recsys.registry import Registry
        from hm_recsys.serving import serve_env

        settings = Settings.from_env({"HM_RECSYS_HOME": str(home)})
        files = Registry(settings).fetch_state(version)
        logs = home / "bench-logs"
        logs.mkdir(exist_ok=True)

        svc_port, base_port = free_port(), free_port()
        env = serve_env(settings, a.workers, base={k: v for k, v in os.environ.items()
                                                   if not k.startswith(("HM_RECSYS_", "MLFLOW_TRACKING"))})
        procs.append(Proc("service", [sys.executable, "-m", "hm_recsys.cli", "serve", "--port", str(svc_port)],
                          env, logs / "service.log"))
        procs.append(Proc("baseline", [sys.executable, str(Path(__file__).resolve()), "--serve-baseline",
                                       "--bundle", str(files.bundle_dir), "--index", str(files.state_dir / "index"),
                                       "--version", version, "--port", str(base_port)], env, logs / "baseline.log"))
        servers = [("bentoml service", svc_port), ("fastapi+scann naive", base_port)]
        if not a.no_stock:
            # the same service with BentoML's stock settings for what the service tunes
            stock_port = free_port()
            stock_env = serve_env(settings, a.workers, base=env, bentoml_config=STOCK_BENTOML)
            procs.append(Proc("service-stock", [sys.executable, "-m", "hm_recsys.cli", "serve", "--port",
                                                str(stock_port)], stock_env, logs / "service-stock.log"))
            servers.append(("bentoml, stock config", stock_port))
        for pr, (_, port) in zip(procs, servers):
            pr.wait_ready(f"http://127.0.0.1:{port}/readyz")

        from hm_recsys import bundle

        rec = bundle.load(files.bundle_dir)
        known = rec.known_customer_ids()
        rng = np.random.default_rng(a.seed)
        n = 2000
        ids = [known[i] for i in rng.choice(len(known), size=n)]
        unknown = rng.random(n) < a.unknown_share
        ids = [("%064x" % rng.integers(0, 2**63)) if u else c for c, u in zip(ids, unknown)]
        bodies = [json.dumps({"customer_id": c, "top_k": 12}).encode() for c in ids]

        # the service answers what the evaluation scores (the served state's fused ranking); the naive
        # baseline ranks by the towers alone, so only the service is checked, against the evaluation
        from hm_recsys.served import ServedState

        state = ServedState.load(files.state_dir, verify=False)
        sample = [c for c, u in list(zip(ids, unknown))[:50] if not u]
        want = state.predictions(sample, k=12)
        same = sum([r["article_id"] for r in post(svc_port, json.dumps({"customer_id": c, "top_k": 12}).encode())[
            "recommendations"]] == want[c] for c in sample)
        checked = len(sample)
        from hm_recsys.index import read_manifest

        sc = read_manifest(files.state_dir / "index").scann_config
        kind = "brute force" if sc["brute_force"] else f"{sc['num_leaves']} leaves, search {sc['leaves_to_search']}"
        print(f"\nmodel version {version}: {len(known):,} customers, {len(rec.article_ids):,} articles, "
              f"dim {rec.dim}; ScaNN index ({kind})")
        print(f"the service answers exactly what the evaluation scored for {same}/{checked} known customers")
        print(f"load: {a.seconds:g} s per point after {a.warmup} warm-up requests; {int(unknown.sum())}/{n} "
              f"request bodies are unknown customers; cpu cores: {os.cpu_count()}; load average before: "
              f"{os.getloadavg()[0]:.1f} (client and all servers share these cores)\n")

        rows = []
        for c in a.concurrency:
            # servers take turns at each level, so drift in the machine's load hits them alike
            res = [run_load(port, bodies, c, a.seconds, a.warmup) for _, port in servers]
            rows.append((c, res[0], res[1], res[2:]))

        hdr = f"{'conc':>4}  {'server':<26}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        print(hdr)
        print("-" * len(hdr))
        for c, s, b, extra in rows:
            for (name, _), r in zip(servers, [s, b, *extra]):
                print(f"{c:>4}  {name:<26}{r['rps']:>9.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['errors']:>8}")
            print(f"{'':>4}  {'ratio service/naive':<26}{s['rps'] / b['rps']:>8.2f}x{s['p50'] / b['p50']:>8.2f}x"
                  f"{s['p99'] / b['p99']:>8.2f}x")
            for r in extra:
                print(f"{'':>4}  {'ratio service/stock':<26}{s['rps'] / r['rps']:>8.2f}x"
                      f"{s['p50'] / r['p50']:>8.2f}x{s['p99'] / r['p99']:>8.2f}x")
        print(f"load average after: {os.getloadavg()[0]:.1f}\n")
        ok = True
        for c, s, b, _ in rows:
            good = s["rps"] >= b["rps"] and s["errors"] == 0
            ok &= good
            print(f"target req/s >= baseline at concurrency {c}: {'PASS' if good else 'FAIL'} "
                  f"({s['rps']:.0f} vs {b['rps']:.0f})")
        at8 = [s for c, s, _, _ in rows if c == 8]
        if at8:
            good = at8[0]["p99"] < 20.0
            ok &= good
            print(f"target p99 < 20 ms at concurrency 8: {'PASS' if good else 'FAIL'} ({at8[0]['p99']:.2f} ms)")
        return 0 if ok else 1
    finally:
        for pr in procs:
            pr.stop()
        if temp:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
