"""The local Airflow stack for the benchmarks, and a sampler of what its tasks hold in memory.

* ``AirflowStack``: ``airflow db migrate``, then the four processes
  ``scripts/stack.sh`` runs (api-server, scheduler, dag-processor, triggerer;
  this repository's airflow.cfg: 127.0.0.1, LocalExecutor, sqlite metadata
  DB under the runtime folder), each in a session of its own and stopped by
  PID (``hm_recsys.procs.kill_tree``); a REST client authenticated as the
  admin of SimpleAuthManager's generated password file.
* ``TreeSampler``: a thread that reads, every ``interval`` seconds, the RSS of
  every process under the given roots (the scheduler, the service). Under the
  scheduler, the processes of a task are told apart by their titles: the
  LocalExecutor worker that supervises a task instance is titled
  ``airflow worker -- LocalExecutor: <ti id>`` and the task process it forks
  ``airflow worker -- <ti id>``; everything below them belongs to that task
  instance. For those processes it also reads PSS (``/proc/<pid>/smaps_rollup``),
  on every ``pss_every``-th sample only (the kernel walks a process's whole
  address space for it: for a 4 GiB training task that is CPU taken from the
  2 cores being measured): the worker is a fork of the scheduler and the task
  a fork of the worker, so their RSS counts shared pages more than once, PSS
  once. (The supervising worker keeps its title for a few seconds after its task process exited,
  finishing up; ``Sample.running`` holds the TI ids whose task process is alive.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from hm_recsys.procs import kill_tree

TERMINAL = {"success", "failed"}
# (name in the logs and in scripts/stack.sh's PID files, airflow arguments)
PARTS = {
    "airflow-api-server": ["api-server"],
    "airflow-scheduler": ["scheduler", "--skip-serve-logs"],
    "airflow-dag-processor": ["dag-processor"],
    "airflow-triggerer": ["triggerer", "--skip-serve-logs"],
}


class StackError(RuntimeError):
    """The stack did not start, a part of it died, or a wait ran out; the message holds the logs' tails."""


def wait_for(predicate: Callable, what: str, timeout: float, diagnosis: Callable[[], str], poll: float = 1.0):
    """Poll ``predicate`` until it returns something truthy; at ``timeout``, ``StackError`` with ``diagnosis()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = predicate()
        if out:
            return out
        time.sleep(poll)
    raise StackError(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnosis()}")


class AirflowStack:
    """The four Airflow processes of the local stack, started with ``env`` and stopped by PID (group)."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs = env, logs
        self.airflow_home = Path(env["AIRFLOW_HOME"])
        self.url = f"http://127.0.0.1:{env['HM_RECSYS_AIRFLOW_PORT']}"
        self.procs: dict[str, subprocess.Popen] = {}
        self._files: list = []
        self._client = None

    def _popen(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        self._files.append(log)
        proc = subprocess.Popen([sys.executable, "-m", "airflow", *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def migrate(self, timeout: float) -> None:
        proc = self._popen("airflow-db-migrate", ["db", "migrate"])
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            code = None
        if code != 0:
            raise StackError(f"airflow db migrate {'timed out' if code is None else f'exited with {code}'}\n"
                             f"{self.diagnosis()}")

    def start(self) -> None:
        for name, args in PARTS.items():
            self._popen(name, args)

    @property
    def scheduler_pid(self) -> int:
        return self.procs["airflow-scheduler"].pid

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
        for proc in reversed(self.procs.values()):
            kill_tree(proc)
        for f in self._files:
            f.close()

    def write_pid_files(self, run_dir: Path) -> None:
        """PID files where ``scripts/stack.sh`` keeps its own, so ``scripts/stack.sh stop`` stops these."""
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in PARTS:
            if name in self.procs:
                (run_dir / f"{name}.pid").write_text(f"{self.procs[name].pid}\n")

    def check_alive(self) -> None:
        for name in PARTS:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise StackError(f"{name} exited with {proc.returncode}\n{self.diagnosis()}")

    def wait_ready(self, dag_ids: tuple[str, ...], timeout: float) -> None:
        """API server and scheduler healthy, the admin's token issued, ``dag_ids`` parsed and registered."""
        import httpx

        def healthy() -> bool:
            self.check_alive()
            try:
                r = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5)
            except httpx.HTTPError:
                return False
            return r.status_code == 200 and r.json()["scheduler"]["status"] == "healthy"

        deadline = time.monotonic() + timeout
        wait_for(healthy, "the Airflow API server and scheduler to be healthy", timeout, self.diagnosis)
        pw_file = self.airflow_home / "simple_auth_manager_passwords.json.generated"
        wait_for(lambda: pw_file.is_file() and pw_file.stat().st_size > 0, "the generated admin password file",
                 max(deadline - time.monotonic(), 1), self.diagnosis)
        r = httpx.post(f"{self.url}/auth/token", timeout=30,
                       json={"username": "admin", "password": json.loads(pw_file.read_text())["admin"]})
        if r.status_code != 201:
            raise StackError(f"POST /auth/token: {r.status_code} {r.text[:500]}")
        self._client = httpx.Client(base_url=f"{self.url}/api/v2", timeout=60,
                                    headers={"Authorization": f"Bearer {r.json()['access_token']}"})

        def registered() -> bool:
            self.check_alive()
            return all(self._client.get(f"/dags/{d}").status_code == 200 for d in dag_ids)

        wait_for(registered, f"the dag-processor to register {', '.join(dag_ids)}",
                 max(deadline - time.monotonic(), 1), self.diagnosis)

    def request(self, method: str, path: str, **kw) -> dict:
        r = self._client.request(method, path, **kw)
        if r.status_code != 200:
            raise StackError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r.json()

    def get(self, path: str, **params) -> dict:
        return self.request("GET", path, params=params)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def xcom(self, dag_id: str, run_id: str, task_id: str):
        value = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")["value"]
        return json.loads(value) if isinstance(value, str) else value

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, lines: int = 60) -> str:
        """The last ``lines`` lines of a try's log, rendered from Airflow's structured entries."""
        content = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                           full_content="true")["content"]
        out: list[str] = []
        for entry in content:
            if not isinstance(entry, dict):
                out.extend(str(entry).splitlines())
                continue
            out.extend(f"{entry.get('level', '')[:5]:>5} {entry.get('event', '')}".splitlines())
            for exc in entry.get("error_detail") or []:
                out.extend(f"  File {f.get('filename')}:{f.get('lineno')} in {f.get('name')}"
                           for f in exc.get("frames", []))
                out.append(f"  {exc.get('exc_type')}: {exc.get('exc_value')}")
        return "\n".join(out[-lines:])

    def diagnosis(self) -> str:
        """The tails of the processes' logs, for an error message."""
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(self.logs.glob("*.log")))


# ---------------------------------------------------------------------------
# Memory of the task instances
# ---------------------------------------------------------------------------
_TI_TITLE = re.compile(r"airflow worker -- (LocalExecutor(?: \[[^\]]*\])?: )?"
                       r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


@dataclass
class Sample:
    t: float  # seconds since the epoch
    roots: dict[str, int]  # root name -> RSS bytes summed over its whole process tree
    tasks: dict[str, tuple[int, int, int]]  # TI id -> (RSS, PSS bytes or -1 if not read, processes) of its tree
    running: set[str]  # TI ids whose task process (not only its supervising worker) is alive


class TreeSampler(threading.Thread):
    """Samples the process trees under ``roots`` (name -> PID) every ``interval`` s until ``stop()``."""

    def __init__(self, roots: dict[str, int], interval: float = 0.5, pss_every: int = 10):
        super().__init__(name="tree-sampler", daemon=True)
        self.roots, self.interval, self.pss_every = roots, interval, max(1, pss_every)
        self.samples: list[Sample] = []
        self.cpu_seconds = 0.0  # this thread's own CPU time: what the sampling cost
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(self.sample())
            self.cpu_seconds = time.thread_time()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()

    def sample(self) -> Sample:
        t = time.time()
        read_pss = len(self.samples) % self.pss_every == 0  # else every task's PSS is -1 (not read) here
        roots: dict[str, int] = {}
        tasks: dict[str, tuple[int, int, int]] = {}
        running: set[str] = set()
        for name, pid in self.roots.items():
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            info: dict[int, tuple[int, int, str | None]] = {}  # pid -> (parent, RSS, TI id in its title)
            for p in procs:
                try:
                    with p.oneshot():
                        m = _TI_TITLE.search(" ".join(p.cmdline()))
                        info[p.pid] = (p.ppid(), p.memory_info().rss, m.group(2) if m else None)
                except psutil.Error:
                    continue
                if m and not m.group(1):
                    running.add(m.group(2))
            roots[name] = sum(rss for _, rss, _ in info.values())
            for pid in info:
                ti = _owner(pid, info)
                if ti is None:
                    continue
                try:
                    pss = psutil.Process(pid).memory_full_info().pss if read_pss else 0
                except psutil.Error:
                    continue
                rss0, pss0, n0 = tasks.get(ti, (0, 0, 0))
                tasks[ti] = (rss0 + info[pid][1], pss0 + pss, n0 + 1)
        if not read_pss:
            tasks = {ti: (rss, -1, n) for ti, (rss, _, n) in tasks.items()}
        return Sample(t, roots, tasks, running)


def _owner(pid: int, info: dict[int, tuple[int, int, str | None]]) -> str | None:
    """The TI id in the title of ``pid`` or of its nearest ancestor that has one."""
    while pid in info:
        parent, _, ti = info[pid]
        if ti is not None:
            return ti
        pid = parent
    return None
