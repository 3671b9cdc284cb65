#!/usr/bin/env bash
# The production topology on one machine, every process on 127.0.0.1 and tracked by PID:
#
#   Airflow api-server, scheduler, dag-processor, triggerer   CeleryExecutor, metadata DB on Postgres
#   Celery workers worker-1 .. worker-N                       separate processes, working folders, hostnames
#   Redis                                                     the Celery broker (already running)
#   Postgres                                                  Airflow's metadata DB + Celery result backend,
#                                                             MLflow's backend store (databases made if missing)
#   MLflow tracking server                                    --serve-artifacts: artifacts only over HTTP
#   hm-recsys serve                                           the service, fetching the champion through MLflow
#
#   scripts/prodstack.sh start | stop | status | env
#
# It is docker/compose.yaml's topology with host processes instead of containers:
# the same commands and the same AIRFLOW__* / MLFLOW_* / HM_RECSYS_* variables.
# What the hosts share is exactly one folder, the data root ($HM_RECSYS_DATA_ROOT:
# incoming drops, warehouse, quarantine, pipeline-run scratch, locks); models and
# served states travel through MLflow. Each process has its own runtime folder
# (HM_RECSYS_HOME) under $PROD/hosts/<name>, as another host would.
#
# Settings (environment, all optional):
#   HM_RECSYS_PROD_HOME      state of this stack           default $HM_RECSYS_HOME/prod
#   HM_RECSYS_PG_URL         Postgres server (a role that may CREATE DATABASE; password in the URL
#                            or PGPASSWORD)                default postgresql+psycopg2://postgres@127.0.0.1:5432
#   HM_RECSYS_PG_PREFIX      database names <prefix>_airflow, <prefix>_mlflow   default hm_recsys
#   HM_RECSYS_REDIS_URL      Celery broker                 default redis://127.0.0.1:6379/0
#   HM_RECSYS_WORKERS        number of Celery workers      default 2
#   AIRFLOW__CELERY__WORKER_CONCURRENCY  tasks per worker  default 1
#   HM_RECSYS_AIRFLOW_PORT / HM_RECSYS_MLFLOW_PORT / HM_RECSYS_SERVE_PORT   8080 / 5000 / 3000
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
HM_RECSYS_HOME="${HM_RECSYS_HOME:-$repo/var}"
PROD="${HM_RECSYS_PROD_HOME:-$HM_RECSYS_HOME/prod}"
# Airflow's home (logs, generated secrets) is the stack's: every Airflow process on this host uses it.
export AIRFLOW_HOME="$PROD/airflow"
# shellcheck source=scripts/env.sh
. "$here/env.sh"
BIN="$HM_RECSYS_REPO/.venv/bin"
export PATH="$BIN:$PATH"  # docker/bin/airflow-init calls `airflow`
RUN="$HM_RECSYS_HOME/run"     # PID files next to the local stack's, so `make stop` stops both
LOGS="$PROD/logs"
mkdir -p "$RUN" "$LOGS" "$PROD/shared" "$PROD/hosts" "$PROD/mlflow/artifacts"

PG_URL="${HM_RECSYS_PG_URL:-postgresql+psycopg2://postgres@127.0.0.1:5432}"
PG_PREFIX="${HM_RECSYS_PG_PREFIX:-hm_recsys}"
WORKERS="${HM_RECSYS_WORKERS:-2}"

# -- the environment every process of the stack shares (compose's x-airflow-common) --------------
export HM_RECSYS_DATA_ROOT="$PROD/shared"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$HM_RECSYS_MLFLOW_PORT"
# Fail a task after ~1 min of an unreachable MLflow (default: ~4 min of backoff); its retry takes over.
export MLFLOW_HTTP_REQUEST_MAX_RETRIES="${MLFLOW_HTTP_REQUEST_MAX_RETRIES:-3}"
export MLFLOW_HTTP_REQUEST_TIMEOUT="${MLFLOW_HTTP_REQUEST_TIMEOUT:-60}"
export HM_RECSYS_SERVE_URL="http://127.0.0.1:$HM_RECSYS_SERVE_PORT"
export HM_RECSYS_SERVICE_URL="$HM_RECSYS_SERVE_URL"  # where deploy/refresh tasks reach it (compose: serve:3000)
export AIRFLOW__CORE__EXECUTOR=CeleryExecutor
export AIRFLOW__CORE__AUTH_MANAGER=airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager
export AIRFLOW__CORE__HOSTNAME_CALLABLE=hm_recsys.procs.hostname
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="$PG_URL/${PG_PREFIX}_airflow"
export AIRFLOW__CELERY__BROKER_URL="${HM_RECSYS_REDIS_URL:-redis://127.0.0.1:6379/0}"
export AIRFLOW__CELERY__RESULT_BACKEND="db+$PG_URL/${PG_PREFIX}_airflow"
export AIRFLOW__CELERY__WORKER_CONCURRENCY="${AIRFLOW__CELERY__WORKER_CONCURRENCY:-1}"
# Training runs for hours: the broker must not redeliver a task that is still running.
export AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT="${AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT:-21600}"
MLFLOW_DB="$PG_URL/${PG_PREFIX}_mlflow"

launch() {  # name, folder, command...: start detached in its own process group and folder, record the PID
  local name=$1 dir=$2; shift 2
  local pidf="$RUN/prod-$name.pid"
  if [ -f "$pidf" ] && pid_alive "$(cat "$pidf")"; then
    echo "  $name already running (pid $(cat "$pidf"))"; return
  fi
  mkdir -p "$dir"
  (cd "$dir" && exec setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null) &
  echo $! >"$pidf"
  echo "  $name started (pid $!, log $LOGS/$name.log)"
}

host() {  # name -> the private runtime folder of one "host" of the stack
  echo "$PROD/hosts/$1"
}

wait_http() {  # url, seconds, name
  for _ in $(seq "$2"); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 1
  done
  echo "$3 did not answer on $1 within ${2}s; see $LOGS/" >&2
  return 1
}

check_backing() {
  "$BIN/python" - "$PG_URL" "$AIRFLOW__CELERY__BROKER_URL" <<'PY' || exit 1
import sys
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
pg, broker = sys.argv[1], sys.argv[2]
try:
    with create_engine(make_url(pg).set(database="postgres")).connect() as c:
        c.execute(text("select 1"))
except Exception as e:
    sys.exit(f"prodstack: Postgres does not answer at {make_url(pg).render_as_string(hide_password=True)}: "
             f"{str(e).splitlines()[0]}\n  start it, or point HM_RECSYS_PG_URL at one")
try:
    import redis
    redis.Redis.from_url(broker, socket_connect_timeout=5).ping()
except Exception as e:
    sys.exit(f"prodstack: Redis does not answer at {broker.split('@')[-1]}: {e}\n"
             "  start it, or point HM_RECSYS_REDIS_URL at one")
PY
}

create_databases() {  # <prefix>_airflow and <prefix>_mlflow, made if missing (idempotent)
  "$BIN/python" - "$PG_URL" "${PG_PREFIX}_airflow" "${PG_PREFIX}_mlflow" <<'PY'
import sys
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
engine = create_engine(make_url(sys.argv[1]).set(database="postgres"), isolation_level="AUTOCOMMIT")
with engine.connect() as c:
    for name in sys.argv[2:]:
        if c.execute(text("select 1 from pg_database where datname = :n"), {"n": name}).first() is None:
            c.execute(text(f'create database "{name}"'))
            print(f"  created database {name}")
PY
}

admin_password() {  # generated once into the stack's secrets (mode 600), like docker/.env's
  local f="$AIRFLOW_HOME/admin-password"
  [ -s "$f" ] || (umask 077; "$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(18))' > "$f")
  cat "$f"
}

start() {
  echo "hm-recsys production stack on 127.0.0.1 (state: $PROD)"
  check_backing
  create_databases
  # -- MLflow: schema first (new or after an upgrade), then the server with proxied artifacts
  "$BIN/mlflow" db upgrade "$MLFLOW_DB" >"$LOGS/mlflow-db-upgrade.log" 2>&1 \
    || { cat "$LOGS/mlflow-db-upgrade.log" >&2; exit 1; }
  launch mlflow "$(host mlflow)" "$BIN/mlflow" server --host 127.0.0.1 --port "$HM_RECSYS_MLFLOW_PORT" \
    --backend-store-uri "$MLFLOW_DB" --serve-artifacts --artifacts-destination "$PROD/mlflow/artifacts" \
    --workers 1
  # -- Airflow: migrate + admin user (docker/bin/airflow-init), then its four components
  AIRFLOW_ADMIN_PASSWORD="${AIRFLOW_ADMIN_PASSWORD:-$(admin_password)}" \
    "$HM_RECSYS_REPO/docker/bin/airflow-init" >"$LOGS/airflow-init.log" 2>&1 \
    || { cat "$LOGS/airflow-init.log" >&2; exit 1; }
  launch airflow-api-server "$(host airflow-api-server)" "$BIN/airflow" api-server
  launch airflow-scheduler "$(host airflow-scheduler)" "$BIN/airflow" scheduler --skip-serve-logs
  launch airflow-dag-processor "$(host airflow-dag-processor)" "$BIN/airflow" dag-processor
  launch airflow-triggerer "$(host airflow-triggerer)" "$BIN/airflow" triggerer --skip-serve-logs
  # -- Celery workers: each its own runtime folder and hostname (the name tasks record)
  for i in $(seq "$WORKERS"); do
    HM_RECSYS_HOME="$(host "worker-$i")" BENTOML_HOME="$(host "worker-$i")/bentoml" HM_RECSYS_HOSTNAME="worker-$i" \
      launch "worker-$i" "$(host "worker-$i")" "$BIN/airflow" celery worker \
      --celery-hostname "worker-$i@%h" --skip-serve-logs
  done
  # -- the service: starts with no model and loads the champion once one is promoted
  HM_RECSYS_HOME="$(host serve)" BENTOML_HOME="$(host serve)/bentoml" launch serve "$(host serve)" "$BIN/hm-recsys" serve \
    --host 127.0.0.1 --port "$HM_RECSYS_SERVE_PORT"
  wait_http "$MLFLOW_TRACKING_URI/health" 120 "MLflow"
  wait_http "http://127.0.0.1:$HM_RECSYS_AIRFLOW_PORT/api/v2/monitor/health" 180 "the Airflow API server"
  wait_http "$HM_RECSYS_SERVE_URL/livez" 180 "the recommendation service"
  cat <<EOF
Airflow UI:  http://127.0.0.1:$HM_RECSYS_AIRFLOW_PORT   user admin, password in $AIRFLOW_HOME/admin-password
MLflow UI:   $MLFLOW_TRACKING_URI
Service:     $HM_RECSYS_SERVE_URL   (ready once a champion is promoted)
Data root:   $HM_RECSYS_DATA_ROOT   (shared by every worker; drop files into data/incoming/)
Use the CLI against this stack:  eval "\$(scripts/prodstack.sh env)"; hm-recsys generate; hm-recsys ingest
EOF
}

names() {
  echo mlflow airflow-api-server airflow-scheduler airflow-dag-processor airflow-triggerer serve
  for f in "$RUN"/prod-worker-*.pid; do [ -e "$f" ] && basename "$f" .pid | sed 's/^prod-//'; done; true
}

stop() {
  for n in $(names); do stop_pidfile "$n" "$RUN/prod-$n.pid"; done
}

case "${1:-status}" in
  start) start ;;
  stop) stop ;;
  status)
    for n in $(names); do
      f="$RUN/prod-$n.pid"
      [ -f "$f" ] || continue
      if pid_alive "$(cat "$f")"; then echo "  $n running (pid $(cat "$f"))"; else echo "  $n dead"; fi
    done ;;
  env)  # what a shell needs to run hm-recsys / airflow commands against this stack
    HM_RECSYS_HOME="$(host cli)"
    for v in HM_RECSYS_HOME HM_RECSYS_DATA_ROOT MLFLOW_TRACKING_URI AIRFLOW_HOME AIRFLOW_CONFIG \
             AIRFLOW__CORE__EXECUTOR AIRFLOW__CORE__AUTH_MANAGER AIRFLOW__DATABASE__SQL_ALCHEMY_CONN \
             AIRFLOW__CELERY__BROKER_URL AIRFLOW__CELERY__RESULT_BACKEND HM_RECSYS_SERVE_URL; do
      printf 'export %s=%q\n' "$v" "${!v}"
    done ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
