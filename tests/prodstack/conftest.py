"""The production topology, really run: ``scripts/prodstack.sh`` (= ``make prod-local``) on 127.0.0.1.

Postgres and Redis must already run (the dev and CI machines start them).
Without them the prodstack tests skip with a one-line reason, except under
``CI=true``, where a missing service is a failure: CI must not turn green by
skipping the production path.

Each session gets its own Postgres databases (``hmtest_<random>_airflow`` and
``_mlflow``, dropped at the end), its own Redis database (flushed), free
ports and a temporary state folder; every process is stopped by PID through
``scripts/prodstack.sh stop``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hm_recsys.procs import descendants, free_port
from tests.integration.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("HM_RECSYS_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("HM_RECSYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
TIMEOUT = 420.0  # seconds for one wait on the stack (a run with a fault and a retry included)
TERMINAL = {"success", "failed"}


def backing_services() -> str | None:
    """None if Postgres and Redis answer, else why not (one line)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    try:
        with create_engine(make_url(PG_URL).set(database="postgres"), connect_args={"connect_timeout": 5}).connect() as c:
            c.execute(text("select 1"))
    except Exception as e:  # noqa: BLE001 (any failure means: not here)
        return f"Postgres does not answer at {make_url(PG_URL).render_as_string(hide_password=True)} " \
               f"({str(e).splitlines()[0][:120]})"
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5).ping()
    except Exception as e:  # noqa: BLE001
        return f"Redis does not answer at {REDIS_URL} ({e})"
    return None


def require_backing_services() -> None:
    missing = backing_services()
    if missing is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and the production stack cannot run: {missing}", pytrace=False)
    pytest.skip(f"prodstack: {missing}; start Postgres and Redis to run these (README: the production-stack tests)")


@dataclass
class ProdStack:
    """The running stack: its environment, the REST API as admin, and the processes by name."""

    env: dict[str, str]
    root: Path
    _client: object = None
    timings: dict[str, float] = field(default_factory=dict)

    # -- places -------------------------------------------------------------------------
    @property
    def prod(self) -> Path:
        return Path(self.env["HM_RECSYS_PROD_HOME"])

    @property
    def data_root(self) -> Path:
        return self.prod / "shared"

    def host(self, name: str) -> Path:
        return self.prod / "hosts" / name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['HM_RECSYS_AIRFLOW_PORT']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.env['HM_RECSYS_MLFLOW_PORT']}"

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.env['HM_RECSYS_SERVE_PORT']}"

    # -- processes ----------------------------------------------------------------------
    def script(self, *args: str, timeout: float = 300) -> str:
        p = subprocess.run([str(REPO / "scripts" / "prodstack.sh"), *args], env=self.env, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert p.returncode == 0, f"prodstack.sh {' '.join(args)}: exit {p.returncode}\n{p.stdout}\n{p.stderr}\n" \
                                  f"{self.diagnosis()}"
        return p.stdout

    def pid(self, name: str) -> int:
        return int((Path(self.env["HM_RECSYS_HOME"]) / "run" / f"prod-{name}.pid").read_text())

    def alive(self, name: str) -> bool:
        """The component's process exists and is not a zombie (exited; nobody reaps orphans in some sandboxes)."""
        try:
            stat = Path(f"/proc/{self.pid(name)}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def kill(self, name: str, sig: int = signal.SIGKILL, wait: float = 60) -> None:
        """Signal the component's process group, and with SIGKILL every descendant too (a lost host)."""
        pid = self.pid(name)
        below = descendants(pid) if sig == signal.SIGKILL else []
        os.killpg(pid, sig)
        for p in below:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not self.alive(name), f"{name} (pid {pid}) to exit", self.diagnosis, wait, every=0.2)

    # -- the REST API -------------------------------------------------------------------
    @property
    def api(self):
        import httpx

        if self._client is None:
            pw = (Path(self.env["AIRFLOW_HOME"]) / "admin-password").read_text().strip()
            r = httpx.post(f"{self.url}/auth/token", json={"username": "admin", "password": pw}, timeout=30)
            assert r.status_code == 201, r.text
            self._client = httpx.Client(base_url=f"{self.url}/api/v2", timeout=30,
                                        headers={"Authorization": f"Bearer {r.json()['access_token']}"})
        return self._client

    def get(self, path: str, **params) -> dict:
        import httpx

        for attempt in range(5):  # the API server may be briefly busy while the stack is under load
            try:
                r = self.api.get(path, params=params)
                break
            except httpx.HTTPError:
                if attempt == 4:
                    raise
                time.sleep(2)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text[:500]}"
        return r.json()

    def unpause(self, *dag_ids: str) -> None:
        wait_for(lambda: all(self.api.get(f"/dags/{d}").status_code == 200 for d in dag_ids),
                 "the dag-processor to register the DAGs", self.diagnosis, TIMEOUT)
        for d in dag_ids:
            r = self.api.patch(f"/dags/{d}", json={"is_paused": False})
            assert r.status_code == 200 and r.json()["is_paused"] is False, r.text

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        r = self.api.post(f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        assert r.status_code == 200, r.text
        return r.json()["dag_run_id"]

    def tasks(self, dag_id: str, run_id: str) -> dict[str, dict]:
        return {ti["task_id"]: ti for ti in self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
                ["task_instances"]}

    def tries(self, dag_id: str, run_id: str, task_id: str) -> list[dict]:
        """Every try of one task instance, oldest first (``hostname`` says which worker ran it)."""
        got = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/tries")["task_instances"]
        return sorted(got, key=lambda t: t["try_number"])

    def xcom(self, dag_id: str, run_id: str, task_id: str):
        value = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")
        return json.loads(value["value"]) if isinstance(value["value"], str) else value["value"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        path = Path(self.env["AIRFLOW_HOME"]) / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / \
            f"task_id={task_id}" / f"attempt={try_number}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_run(self, dag_id: str, run_id: str, timeout: float = TIMEOUT) -> dict:
        def done():
            run = self.get(f"/dags/{dag_id}/dagRuns/{run_id}")
            return run if run["state"] in TERMINAL else None

        run = wait_for(done, f"{dag_id} run {run_id} to finish", self.diagnosis, timeout)
        assert run["state"] == "success", (
            f"{dag_id} {run_id}: {run['state']}, tasks "
            f"{ {t: (ti['state'], ti['try_number']) for t, ti in self.tasks(dag_id, run_id).items()} }\n"
            f"{self.diagnosis()}")
        return run

    def wait_task(self, dag_id: str, run_id: str, task_id: str, states: set[str], timeout: float = TIMEOUT,
                  every: float = 0.5) -> dict:
        return wait_for(lambda: (ti := self.tasks(dag_id, run_id).get(task_id)) and ti["state"] in states and ti,
                        f"{dag_id}.{task_id} to be {states}", self.diagnosis, timeout, every)

    def diagnosis(self) -> str:
        out = []
        logs = Path(self.env["AIRFLOW_HOME"]) / "logs"
        for path in sorted(logs.glob("dag_id=*/**/*.log"), key=lambda p: p.stat().st_mtime)[-6:]:
            out.append(f"--- {path.relative_to(logs)}\n{path.read_text(errors='replace')[-2500:]}")
        for path in sorted((self.prod / "logs").glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}")
        return "\n".join(out)


def _drop_databases(prefix: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    engine = create_engine(make_url(PG_URL).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        for name in (f"{prefix}_airflow", f"{prefix}_mlflow"):
            c.execute(text(f'drop database if exists "{name}" with (force)'))
    engine.dispose()


@pytest.fixture(scope="module")
def prodstack(tmp_path_factory) -> ProdStack:
    """``scripts/prodstack.sh start`` in a temporary folder; stopped by PID and its databases dropped after."""
    require_backing_services()
    import redis

    root = tmp_path_factory.mktemp("prodstack")
    prefix = f"hmtest_{secrets.token_hex(4)}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "HM_RECSYS_", "MLFLOW_TRACKING", "BENTOML_HOME"))}
    env.update(
        HM_RECSYS_HOME=str(root / "var"),
        HM_RECSYS_PROD_HOME=str(root / "var" / "prod"),
        HM_RECSYS_PG_URL=PG_URL,
        HM_RECSYS_PG_PREFIX=prefix,
        HM_RECSYS_REDIS_URL=REDIS_URL,
        HM_RECSYS_AIRFLOW_PORT=str(free_port()),
        HM_RECSYS_MLFLOW_PORT=str(free_port()),
        HM_RECSYS_SERVE_PORT=str(free_port()),
        # Only what a test triggers runs: no cron runs, DAGs created paused (the test unpauses two).
        AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",
        # A killed worker's task is declared lost after 30 s without heartbeat (production: 300 s).
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="30",
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL="5",
        # The Bento build is the service tests' subject; here the switch of the running service is.
        HM_RECSYS_DEPLOY_BENTO="0",
        HM_RECSYS_SERVE_POLL_SECONDS="600",  # the swap must come from the deploy task
        GX_ANALYTICS_ENABLED="false",
    )
    env["AIRFLOW_HOME"] = str(root / "var" / "prod" / "airflow")  # what prodstack.sh sets, for the helpers here
    redis.Redis.from_url(REDIS_URL).flushdb()
    stack = ProdStack(env, root)
    t0 = time.monotonic()
    try:
        stack.script("start", timeout=400)
        stack.timings["start"] = time.monotonic() - t0
        yield stack
    finally:
        try:
            stack.script("stop", timeout=200)
            left = [n for n in ("mlflow", "airflow-scheduler", "worker-1", "worker-2", "serve")
                    if (Path(env["HM_RECSYS_HOME"]) / "run" / f"prod-{n}.pid").exists()]
            assert not left, f"still recorded as running after stop: {left}"
        finally:
            _drop_databases(prefix)
            redis.Redis.from_url(REDIS_URL).flushdb()
            if stack._client is not None:
                stack._client.close()
            shutil.rmtree(root / "var" / "prod" / "shared" / "runs", ignore_errors=True)
