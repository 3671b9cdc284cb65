#!/usr/bin/env bash
# Start and stop the local stack on 127.0.0.1, each process tracked by PID.
#
#   scripts/stack.sh start airflow|mlflow|serve
#   scripts/stack.sh stop [airflow|mlflow|serve]     (default: everything started)
#   scripts/stack.sh status
#
# Airflow runs as four processes (api-server, scheduler, dag-processor,
# triggerer) rather than `airflow standalone`, whose log servers bind 0.0.0.0.
# PID files and logs live under $HM_RECSYS_HOME/run and $HM_RECSYS_HOME/logs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/env.sh
. "$here/env.sh"
BIN="$HM_RECSYS_REPO/.venv/bin"
RUN="$HM_RECSYS_HOME/run"
LOGS="$HM_RECSYS_HOME/logs"
mkdir -p "$RUN" "$LOGS"

launch() {  # name, command...: start detached in its own process group, record the PID
  local name=$1; shift
  local pidf="$RUN/$name.pid"
  if [ -f "$pidf" ] && pid_alive "$(cat "$pidf")"; then
    echo "  $name already running (pid $(cat "$pidf"))"; return
  fi
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! >"$pidf"
  echo "  $name started (pid $!, log $LOGS/$name.log)"
}

wait_http() {  # url, seconds, name
  local url=$1 secs=$2 name=$3
  for _ in $(seq "$secs"); do
    if curl -fsS -o /dev/null "$url" 2>/dev/null; then return 0; fi
    sleep 1
  done
  echo "$name did not answer on $url within ${secs}s; see $LOGS/" >&2
  return 1
}

stop_one() {  # name
  stop_pidfile "$1" "$RUN/$1.pid"
}

AIRFLOW_PARTS=(airflow-api-server airflow-scheduler airflow-dag-processor airflow-triggerer)

start_airflow() {
  echo "Airflow (metadata DB: $(AIRFLOW__LOGGING__LOGGING_LEVEL=ERROR "$BIN/airflow" config get-value database sql_alchemy_conn 2>/dev/null | sed 's#//.*@#//***@#'))"
  "$BIN/airflow" db migrate >"$LOGS/airflow-db-migrate.log" 2>&1 || { cat "$LOGS/airflow-db-migrate.log" >&2; exit 1; }
  launch airflow-api-server "$BIN/airflow" api-server
  launch airflow-scheduler "$BIN/airflow" scheduler --skip-serve-logs
  launch airflow-dag-processor "$BIN/airflow" dag-processor
  launch airflow-triggerer "$BIN/airflow" triggerer --skip-serve-logs
  wait_http "http://127.0.0.1:$HM_RECSYS_AIRFLOW_PORT/api/v2/monitor/health" 180 "Airflow API server"
  local pw="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
  for _ in $(seq 30); do [ -s "$pw" ] && break; sleep 1; done
  echo "Airflow UI: http://127.0.0.1:$HM_RECSYS_AIRFLOW_PORT  user: admin  password: $("$BIN/python" -c "import json,sys; print(json.load(open(sys.argv[1]))['admin'])" "$pw")"
}

start_mlflow() {
  local uri="${MLFLOW_TRACKING_URI:-sqlite:///$HM_RECSYS_HOME/mlflow/mlflow.db}"
  mkdir -p "$HM_RECSYS_HOME/mlflow/artifacts"
  launch mlflow "$BIN/mlflow" server --host 127.0.0.1 --port "$HM_RECSYS_MLFLOW_PORT" \
    --backend-store-uri "$uri" --default-artifact-root "$HM_RECSYS_HOME/mlflow/artifacts" --workers 1
  wait_http "http://127.0.0.1:$HM_RECSYS_MLFLOW_PORT/health" 120 "MLflow"
  echo "MLflow UI: http://127.0.0.1:$HM_RECSYS_MLFLOW_PORT"
}

start_serve() {
  launch serve "$BIN/hm-recsys" serve --host 127.0.0.1 --port "$HM_RECSYS_SERVE_PORT"
  wait_http "http://127.0.0.1:$HM_RECSYS_SERVE_PORT/readyz" 180 "the recommendation service"
  echo "Recommendation service: http://127.0.0.1:$HM_RECSYS_SERVE_PORT  (POST /recommend)"
}

cmd=${1:-status}; what=${2:-all}
case "$cmd" in
  start)
    case "$what" in
      airflow) start_airflow ;; mlflow) start_mlflow ;; serve) start_serve ;;
      *) echo "usage: $0 start airflow|mlflow|serve" >&2; exit 2 ;;
    esac ;;
  stop)
    case "$what" in
      airflow) for p in "${AIRFLOW_PARTS[@]}"; do stop_one "$p"; done ;;
      mlflow|serve) stop_one "$what" ;;
      all) for f in "$RUN"/*.pid; do [ -e "$f" ] && stop_one "$(basename "$f" .pid)"; done; true ;;
      *) echo "usage: $0 stop [airflow|mlflow|serve]" >&2; exit 2 ;;
    esac ;;
  status)
    for f in "$RUN"/*.pid; do
      [ -e "$f" ] || { echo "nothing started"; break; }
      n=$(basename "$f" .pid); p=$(cat "$f")
      if pid_alive "$p"; then echo "  $n running (pid $p)"; else echo "  $n dead (stale pid $p)"; fi
    done ;;
  *) echo "usage: $0 start|stop|status [airflow|mlflow|serve]" >&2; exit 2 ;;
esac
