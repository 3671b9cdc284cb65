"""Benchmark: the whole weekly DAG (hm_retrain) at full scale, run by the real scheduler (goal: <= 15 min on 2 cores).

    .venv/bin/python bench/dag_full.py                              # full scale (~1.37M customers)
    .venv/bin/python bench/dag_full.py --scale tiny --epochs 2      # the same path in a few minutes

Everything happens in one fresh runtime folder (``HM_RECSYS_HOME``; default
``var/bench/dag_full-<scale>``, wiped at the start of the next run):

1. ``hm-recsys generate --scale S --drop-weeks 1``: H&M-format data with its
   last week held back as a weekly drop file; ``hm-recsys ingest --raw``: the
   history into the Parquet warehouse. Both are timed (wall time and peak RSS)
   and printed, but are not part of the DAG's figure. The drop is placed in
   ``data/incoming/``, where the DAG's first task finds it.
2. The service (``hm-recsys serve`` on a free 127.0.0.1 port, with no
   champion yet; alias polling slowed to 600 s, so the switch comes from the
   deploy task's reload request) and the local Airflow stack as
   ``scripts/stack.sh`` runs it (api-server, scheduler, dag-processor,
   triggerer; LocalExecutor, sqlite metadata DB), with DAGs created paused
   and ``AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE=False``: the one triggered run
   is the only run.
3. ``hm_retrain`` is unpaused and ONE run is triggered over the REST API:
   validate_incoming (validates and ingests the drop) -> check_data ->
   build_snapshot -> train -> register -> build_index -> evaluate -> gate ->
   promote -> deploy (publishes the served state, builds the Bento, switches
   the running service) -> report. The run is triggered with
   ``force_promote`` (its reason recorded on the version), so promote and
   deploy always run; evaluate does its full work regardless, and the gate's
   own figures are printed.
4. While it runs, a thread samples every 0.5 s the RSS of every process under
   the scheduler (and under the service) and attributes each task's
   processes by their titles (``bench/_airflow.py``). Each task instance's
   start, end and duration come from the REST API.

It prints each task's wall time (REST API: end - start), its share of the
DAG's total, and the peak RSS (read every 0.5 s) and PSS (every 5 s) summed
over its process tree (the LocalExecutor worker that supervises it, ~0.14
GiB RSS mostly shared with the scheduler, the task process and its
children); the time between tasks
(scheduling); the DAG's total wall time (first task start -> last task end)
as a ratio to the 900 s goal; whether only one task ran at a time (task
intervals, and task processes seen alive at once); the scale (customers,
articles, transactions), the core count and the load average when it
started. The same goes to ``--out`` (JSON; default
``var/bench/dag_full-<scale>.json``). A failed run exits 1 with the failed
task's log tail. Every process it started is stopped by PID at the end,
unless ``--keep-stack`` (then ``HM_RECSYS_HOME=<home> scripts/stack.sh stop``
stops them). The Airflow processes, the service and this script share the
machine's cores with the tasks, as they do in production on one host.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from _airflow import TERMINAL, AirflowStack, StackError, TreeSampler, wait_for  # noqa: E402
from _load import ServiceProcess  # noqa: E402

from hm_recsys.procs import free_port  # noqa: E402

DAG = "hm_retrain"
GOAL_S = 15 * 60
GIB = 2**30
MARKER = ".dag_full"  # marks a runtime folder this benchmark made (and may wipe)
START_TIMEOUT_S = 900  # db migrate, then the stack healthy and the DAGs registered (slow on 2 busy cores)
RUN_TIMEOUT_S = 8 * 3600  # the run itself: train alone may take up to its 3 h execution_timeout, plus retries
FORCE_REASON = "bench/dag_full.py: time promote and deploy whatever the gate decides"


def prepare_home(home: Path) -> None:
    """Empty ``home`` if this benchmark made it and nothing of it runs; refuse any other non-empty folder."""
    if home.exists() and any(home.iterdir()):
        if not (home / MARKER).exists():
            raise SystemExit(f"{home} is not empty and was not made by bench/dag_full.py: pass another --home")
        alive = [p for p in (home / "run").glob("*.pid") if _pid_alive(int(p.read_text()))]
        if alive:
            raise SystemExit(f"{home} still has a stack running (--keep-stack): "
                             f"HM_RECSYS_HOME={home} scripts/stack.sh stop")
        shutil.rmtree(home)
    (home / "logs").mkdir(parents=True)
    (home / MARKER).touch()


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def runtime_env(home: Path, airflow_port: int, serve_port: int) -> dict[str, str]:
    """The environment of every process: this runtime folder, fresh secrets, nothing of the caller's stack."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HM_RECSYS_", "MLFLOW_", "BENTOML_", "AIRFLOW"))}
    env.update(
        HM_RECSYS_REPO=str(REPO), HM_RECSYS_HOME=str(home), AIRFLOW_HOME=str(home / "airflow"),
        AIRFLOW_CONFIG=str(REPO / "airflow.cfg"), BENTOML_HOME=str(home / "bentoml"),
        HM_RECSYS_AIRFLOW_PORT=str(airflow_port), HM_RECSYS_SERVE_PORT=str(serve_port),
        HM_RECSYS_ADMIN_TOKEN=secrets.token_urlsafe(32),
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(64),
        AIRFLOW__API__SECRET_KEY=secrets.token_urlsafe(32),
        AIRFLOW__CORE__FERNET_KEY=base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",  # only hm_retrain is unpaused
        AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",  # no scheduled runs: the triggered run is the only one
        MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        BENTOML_DO_NOT_TRACK="true", DO_NOT_TRACK="1", GX_ANALYTICS_ENABLED="false",
        GLOG_minloglevel="2", PYTHONUNBUFFERED="1",
    )
    (home / "airflow").mkdir(parents=True, exist_ok=True)
    return env


def run_cli(label: str, args: list[str], env: dict[str, str], logs: Path) -> dict:
    """``hm-recsys <args>`` to completion: wall seconds, peak RSS and its stdout; exits with the log tail on failure."""
    out, log = logs / f"{label}.out", logs / f"{label}.log"
    t0 = time.perf_counter()
    with open(out, "wb") as fo, open(log, "wb") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "hm_recsys.cli", *args], env=env, stdout=fo, stderr=fe,
                                stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it, with its resource usage (peak RSS)
    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"hm-recsys {' '.join(args)} exited with {proc.returncode}:\n"
                         f"{log.read_text(errors='replace')[-4000:]}")
    peak = usage.ru_maxrss * 1024 / GIB
    print(f"  {label}: {seconds:.1f} s, peak RSS {peak:.2f} GiB", flush=True)
    return {"seconds": round(seconds, 2), "peak_rss_gib": round(peak, 3), "stdout": out.read_text()}


def service_live(service: ServiceProcess) -> bool:
    """The service process answers (it has no champion yet: /readyz waits for the deploy)."""
    import httpx

    if service.proc.poll() is not None:
        raise StackError(f"the service exited with {service.proc.returncode}:\n{service.tail()}")
    try:
        return httpx.get(f"{service.url}/livez", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _ts(value: str | None) -> float | None:
    return dt.datetime.fromisoformat(value).timestamp() if value else None


def wait_for_run(stack: AirflowStack, service: ServiceProcess, run_id: str) -> tuple[dict, list[dict]]:
    """Poll the run every 2 s, with a progress line, until it ends; the run and its task instances."""
    import httpx

    t0 = time.monotonic()
    tty = sys.stderr.isatty()
    shown, shown_at, api_errors = None, 0.0, 0
    while True:
        stack.check_alive()
        if service.proc.poll() is not None:
            raise StackError(f"the service exited with {service.proc.returncode}:\n{service.tail()}")
        elapsed = time.monotonic() - t0
        try:
            run = stack.get(f"/dags/{DAG}/dagRuns/{run_id}")
            tis = stack.task_instances(DAG, run_id)
            api_errors = 0
        except httpx.TransportError as e:  # a busy API server: keep waiting, up to a point
            api_errors += 1
            if api_errors >= 30:
                raise StackError(f"the REST API failed {api_errors} times in a row: {e!r}\n{stack.diagnosis()}") from e
            time.sleep(2.0)
            continue
        if run["state"] in TERMINAL:
            if tty:
                print(file=sys.stderr)
            return run, tis
        if elapsed > RUN_TIMEOUT_S:
            raise StackError(f"the run {run_id} did not finish within {RUN_TIMEOUT_S} s (state {run['state']})\n"
                             f"{stack.diagnosis()}")
        done = sum(ti["state"] in ("success", "skipped") for ti in tis)
        active = [ti for ti in tis if ti["state"] in ("running", "queued", "scheduled", "up_for_retry")]
        doing = ", ".join(
            f"{ti['task_id']} {ti['state']}" + (f" {time.time() - _ts(ti['start_date']):.0f} s" if
                                                 ti["state"] == "running" and ti["start_date"] else "")
            + (f" (try {ti['try_number']})" if ti["try_number"] > 1 else "") for ti in active) or run["state"]
        line = f"  [{elapsed // 60:3.0f}:{elapsed % 60:02.0f}] {done}/{len(tis)} tasks done; {doing}"
        if tty:
            print(f"\r{line:<110}", end="", file=sys.stderr, flush=True)
        elif (key := [(ti["task_id"], ti["state"]) for ti in active]) != shown or elapsed - shown_at >= 60:
            print(line, file=sys.stderr, flush=True)  # to a file: a line per change, else one a minute
            shown, shown_at = key, elapsed
        time.sleep(2.0)


def tries_of(stack: AirflowStack, run_id: str, tis: list[dict]) -> list[dict]:
    """Every try of every task that ran (earlier tries of a retried task from its history)."""
    out = []
    for ti in tis:
        if ti["try_number"] > 1:
            history = stack.get(f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/tries")["task_instances"]
            out += [t for t in history if t["start_date"]]
        elif ti["state"] in TERMINAL:
            out.append(ti)
    return out


def memory_by_task(samples, tis: list[dict], tries: list[dict]) -> tuple[dict[str, dict], int]:
    """Peak RSS / PSS per task id over its tries' process trees; and the most task processes seen alive at once.

    A tree is named by its TI id when that is a task's last try; an earlier
    try (a retry gives the TI a new id) by the try whose [start, end] overlaps
    the tree's sampled span the most.
    """
    spans: dict[str, list[float]] = {}
    for s in samples:
        for ti in s.tasks:
            span = spans.setdefault(ti, [s.t, s.t])
            span[1] = s.t
    by_id = {ti["id"]: ti for ti in tis}

    def owner(ti_id: str) -> dict:
        if ti_id in by_id:
            return by_id[ti_id]
        lo, hi = spans[ti_id]
        return max(tries, key=lambda t: min(hi, _ts(t["end_date"]) or hi) - max(lo, _ts(t["start_date"])))

    peaks: dict[str, dict] = {}
    for ti_id in spans:
        p = peaks.setdefault(owner(ti_id)["task_id"], {"peak_rss_gib": 0.0, "peak_pss_gib": None, "samples": 0,
                                                        "max_processes": 0})
        for s in samples:
            if ti_id in s.tasks:
                rss, pss, n = s.tasks[ti_id]
                p["peak_rss_gib"] = max(p["peak_rss_gib"], rss / GIB)
                if pss >= 0:  # PSS is read on every pss_every-th sample only
                    p["peak_pss_gib"] = max(p["peak_pss_gib"] or 0.0, pss / GIB)
                p["max_processes"] = max(p["max_processes"], n)
                p["samples"] += 1
    concurrent = max((len(s.running) for s in samples), default=0)
    return peaks, concurrent


def report(result: dict) -> None:
    c = result["counts"]
    print(f"\n{DAG} at {result['scale']} scale: {c['customers']:,} customers, {c['articles']:,} articles, "
          f"{c['transactions']:,} transactions (history) + {c['drop_transactions']:,} in the drop week; "
          f"{result['cores']} CPU cores, load average at start "
          f"{' / '.join(f'{x:.2f}' for x in result['load_at_start'])} (1 / 5 / 15 min)")
    total = result["total_s"]
    print(f"\n{'task':<20}{'try':>4}{'wall s':>10}{'share':>8}{'peak RSS GiB':>14}{'peak PSS GiB':>14}")
    for t in result["tasks"]:
        m = t["memory"]
        pss = "-" if not m or m["peak_pss_gib"] is None else f"{m['peak_pss_gib']:.2f}"
        mem = f"{m['peak_rss_gib']:>14.2f}{pss:>14}" if m else f"{'-':>14}{'-':>14}"
        print(f"{t['task_id']:<20}{t['try_number']:>4}{t['wall_s']:>10.1f}{t['wall_s'] / total:>8.1%}{mem}"
              + ("" if t["state"] == "success" else f"  {t['state'].upper()}"))
    print(f"{'(between tasks)':<24}{result['between_tasks_s']:>10.1f}{result['between_tasks_s'] / total:>8.1%}")
    print(f"{'total':<24}{total:>10.1f}{1:>8.1%}")
    if result["not_run"]:
        print(f"not run: {', '.join(f'{k} ({v})' for k, v in result['not_run'].items())}")
    print(f"\ntotal {total:.0f} s = {total / GOAL_S:.2f}x the {GOAL_S} s goal (first task start -> last task end; "
          f"{result['run_s']:.0f} s from the trigger to the run's end)"
          + ("" if result["state"] == "success" else f"; the run {result['state'].upper()}: not a figure for the goal"))
    print(f"one task at a time: task intervals (REST API) overlap: {'YES' if result['tasks_overlap'] else 'no'}; "
          f"task processes seen alive at once: at most {result['max_concurrent_task_processes']}")
    print(f"peak RSS of whole trees: scheduler (scheduler, executor workers, tasks) "
          f"{result['scheduler_tree_peak_rss_gib']:.2f} GiB, service {result['service_tree_peak_rss_gib']:.2f} GiB")
    s = result["sampler"]
    print(f"sampler: {s['samples']} samples every {s['interval_s']} s (PSS on every {s.get('pss_every', 1)}th), "
          f"{s['cpu_s']:.1f} CPU s of this process; a task shorter than the interval may show no sample (-)")
    p = result["prep"]
    print(f"not in the total: generate {p['generate']['seconds']:.1f} s (peak RSS {p['generate']['peak_rss_gib']:.2f} "
          f"GiB), ingest {p['ingest']['seconds']:.1f} s (peak RSS {p['ingest']['peak_rss_gib']:.2f} GiB), "
          f"Airflow db migrate + start {p['airflow_start_s']:.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=("tiny", "small", "full"), default="full")
    p.add_argument("--seed", type=int, default=42, help="generator seed (default 42)")
    p.add_argument("--epochs", type=int, help="the DAG's epochs param (default: the model config's, early stopping)")
    p.add_argument("--home", type=Path, help="runtime folder (default var/bench/dag_full-<scale>; emptied first)")
    p.add_argument("--keep-stack", action="store_true",
                   help="leave Airflow and the service running (stop: HM_RECSYS_HOME=<home> scripts/stack.sh stop)")
    p.add_argument("--out", type=Path, help="results as JSON (default var/bench/dag_full-<scale>.json)")
    a = p.parse_args()
    home = (a.home or REPO / "var" / "bench" / f"dag_full-{a.scale}").resolve()
    out = (a.out or REPO / "var" / "bench" / f"dag_full-{a.scale}.json").resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SIGTERM still runs the cleanup below

    load = os.getloadavg()
    cores = os.cpu_count()
    prepare_home(home)
    logs = home / "logs"
    env = runtime_env(home, free_port(), free_port())
    print(f"{DAG} at {a.scale} scale (seed {a.seed}" + (f", epochs {a.epochs}" if a.epochs else "") +
          f"); runtime folder {home}; {cores} CPU cores, load average {load[0]:.2f}", flush=True)

    raw = home / "data" / "raw"
    prep = {"generate": run_cli("generate", ["generate", "--scale", a.scale, "--seed", str(a.seed), "--drop-weeks",
                                             "1", "--out", str(raw), "--no-progress"], env, logs)}
    prep["ingest"] = run_cli("ingest", ["ingest", "--raw", str(raw), "--warehouse", str(home / "data" / "warehouse"),
                                        "--no-progress"], env, logs)
    counts = json.loads(prep["ingest"].pop("stdout"))["rows"]
    del prep["generate"]["stdout"]
    (drop,) = sorted((raw / "drops").glob("transactions_*.csv"))
    with open(drop, "rb") as f:
        counts["drop_transactions"] = sum(1 for _ in f) - 1
    incoming = home / "data" / "incoming"
    incoming.mkdir(parents=True)
    shutil.copy2(drop, incoming / drop.name)

    from hm_recsys.config import Settings
    from hm_recsys.serving import serve_env

    service_env = serve_env(Settings.from_env(env), base=env, HM_RECSYS_SERVE_POLL_SECONDS="600")
    service = ServiceProcess(service_env, logs / "service.log")
    env["HM_RECSYS_SERVE_PORT"] = str(service.port)
    stack = AirflowStack(env, logs)
    sampler = None
    try:
        t0 = time.perf_counter()
        stack.migrate(timeout=START_TIMEOUT_S)
        stack.start()
        stack.wait_ready((DAG,), timeout=START_TIMEOUT_S)
        prep["airflow_start_s"] = round(time.perf_counter() - t0, 2)
        wait_for(lambda: service_live(service), "the service's /livez", START_TIMEOUT_S, service.tail)
        print(f"  Airflow {stack.url} and the service {service.url} up in {prep['airflow_start_s']:.1f} s", flush=True)

        stack.request("PATCH", f"/dags/{DAG}", json={"is_paused": False})
        conf = {"force_promote": True, "force_reason": FORCE_REASON} | ({"epochs": a.epochs} if a.epochs else {})
        sampler = TreeSampler({"scheduler": stack.scheduler_pid, "service": service.pid})
        sampler.start()
        t_trigger = time.time()
        run_id = stack.request("POST", f"/dags/{DAG}/dagRuns",
                               json={"logical_date": None, "conf": conf, "note": "bench/dag_full.py"})["dag_run_id"]
        print(f"  triggered {DAG} run {run_id}", flush=True)
        run, tis = wait_for_run(stack, service, run_id)
        sampler.stop()

        tries = tries_of(stack, run_id, tis)
        peaks, concurrent = memory_by_task(sampler.samples, tis, tries)
        ran = sorted((ti for ti in tis if ti["state"] in TERMINAL and ti["start_date"]),
                     key=lambda ti: _ts(ti["start_date"]))
        if not ran:
            raise StackError(f"the run {run_id} ended {run['state']} without running a task\n{stack.diagnosis()}")
        start, end = min(_ts(t["start_date"]) for t in ran), max(_ts(t["end_date"]) for t in ran)
        tasks = [{"task_id": ti["task_id"], "state": ti["state"], "try_number": ti["try_number"],
                  "start": ti["start_date"], "end": ti["end_date"],
                  "wall_s": round(_ts(ti["end_date"]) - _ts(ti["start_date"]), 2),
                  "memory": ({k: None if v is None else round(v, 3) for k, v in peaks[ti["task_id"]].items()}
                             if ti["task_id"] in peaks else None)} for ti in ran]
        intervals = sorted((_ts(t["start_date"]), _ts(t["end_date"])) for t in tries if t["end_date"])

        def tree_peak(name: str) -> float:
            return round(max((s.roots.get(name, 0) for s in sampler.samples), default=0) / GIB, 3)

        result = {
            "scale": a.scale, "seed": a.seed, "epochs": a.epochs, "counts": counts, "cores": cores,
            "load_at_start": [round(x, 2) for x in load], "load_at_end": [round(x, 2) for x in os.getloadavg()],
            "home": str(home), "dag_run_id": run_id, "state": run["state"], "conf": conf,
            "goal_s": GOAL_S, "total_s": round(end - start, 2), "ratio_to_goal": round((end - start) / GOAL_S, 3),
            "run_s": round(_ts(run["end_date"]) - t_trigger, 2),
            "between_tasks_s": round(end - start - sum(t["wall_s"] for t in tasks), 2),
            "tasks": tasks, "not_run": {ti["task_id"]: ti["state"] for ti in tis if ti["state"] not in TERMINAL},
            "tasks_overlap": any(nxt[0] < prev[1] for prev, nxt in zip(intervals, intervals[1:])),
            "max_concurrent_task_processes": concurrent,
            "scheduler_tree_peak_rss_gib": tree_peak("scheduler"),
            "service_tree_peak_rss_gib": tree_peak("service"),
            "sampler": {"interval_s": sampler.interval, "pss_every": sampler.pss_every, "samples": len(sampler.samples),
                        "cpu_s": round(sampler.cpu_seconds, 2)},
            "prep": prep,
        }
        if run["state"] == "success":
            gate = stack.xcom(DAG, run_id, "evaluate")
            result["gate"] = {k: gate[k] for k in ("challenger_recall", "best_baseline", "best_baseline_recall",
                                                   "reason")}
            result["deploy"] = stack.xcom(DAG, run_id, "deploy")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        report(result)
        if run["state"] != "success":
            failed = [ti for ti in tis if ti["state"] == "failed"]
            for ti in failed:
                print(f"\n--- log of {ti['task_id']} (try {ti['try_number']}), last lines:\n"
                      f"{stack.task_log(DAG, run_id, ti['task_id'], ti['try_number'])}", file=sys.stderr)
            print(f"\nFAILED: {DAG} run {run_id} ended {run['state']} (failed: "
                  f"{', '.join(ti['task_id'] for ti in failed) or 'none'}); logs under {home}; results {out}",
                  file=sys.stderr)
            return 1
        g, d = result["gate"], result["deploy"]
        print(f"gate: challenger Recall@12 {g['challenger_recall']:.4f} vs best heuristic {g['best_baseline']} "
              f"{g['best_baseline_recall']:.4f} (promotion forced); deploy: version {d['version']} as of {d['as_of']}, "
              f"bento {d['bento']}, service {d['service']}")
        print(f"results: {out}")
        return 0
    except StackError as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if sampler is not None:
            sampler.stop()
        if a.keep_stack:
            stack.write_pid_files(home / "run")
            (home / "run" / "serve.pid").write_text(f"{service.pid}\n")
            print(f"left running: Airflow {stack.url}, the service {service.url}; "
                  f"stop them with: HM_RECSYS_HOME={home} scripts/stack.sh stop")
        else:
            service.stop()
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
