# Source me (bash): the environment every hm-recsys process runs with.
# Sets the runtime folder, Airflow's config, telemetry off, and loads the
# Airflow secrets and the service's admin token, generating them once (mode 600) under the runtime folder.
# Secrets never live in the repo or in airflow.cfg.
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export HM_RECSYS_REPO="$_repo"
export HM_RECSYS_HOME="${HM_RECSYS_HOME:-$_repo/var}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$HM_RECSYS_HOME/airflow}"
export AIRFLOW_CONFIG="${AIRFLOW_CONFIG:-$_repo/airflow.cfg}"
export BENTOML_HOME="${BENTOML_HOME:-$HM_RECSYS_HOME/bentoml}"
export HM_RECSYS_AIRFLOW_PORT="${HM_RECSYS_AIRFLOW_PORT:-8080}"
export HM_RECSYS_MLFLOW_PORT="${HM_RECSYS_MLFLOW_PORT:-5000}"
export HM_RECSYS_SERVE_PORT="${HM_RECSYS_SERVE_PORT:-3000}"
export MLFLOW_DISABLE_TELEMETRY=true BENTOML_DO_NOT_TRACK=true DO_NOT_TRACK=1 GX_ANALYTICS_ENABLED=false
mkdir -p "$AIRFLOW_HOME"
_secrets="$AIRFLOW_HOME/secrets.env"
if [ ! -s "$_secrets" ]; then
  (
    umask 077
    "$_repo/.venv/bin/python" - > "$_secrets" <<'PY'
import base64, secrets
print(f"AIRFLOW__API_AUTH__JWT_SECRET={secrets.token_urlsafe(64)}")
print(f"AIRFLOW__API__SECRET_KEY={secrets.token_urlsafe(32)}")
print(f"AIRFLOW__CORE__FERNET_KEY={base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()}")
PY
  )
fi
if ! grep -q '^HM_RECSYS_ADMIN_TOKEN=' "$_secrets"; then  # the service's /admin/reload token (deploy uses it)
  (umask 077; printf 'HM_RECSYS_ADMIN_TOKEN=%s\n' "$("$_repo/.venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))')" >> "$_secrets")
fi
set -a
# shellcheck disable=SC1090
. "$_secrets"
set +a
unset _repo _secrets

# For the start/stop scripts: is this PID a live process? A zombie (exited, not yet reaped,
# e.g. after its parent went away where PID 1 does not reap) is not.
pid_alive() {
  local s
  s=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [ -n "$s" ] && [ "${s#Z}" = "$s" ]
}

# Stop what a PID file names: SIGTERM its process group, SIGKILL after 20 s, remove the file.
# (Celery's warm shutdown lets a running task finish; Airflow's retries cover what is cut short.)
stop_pidfile() {  # label, pid file
  [ -f "$2" ] || return 0
  local pid; pid=$(cat "$2")
  if pid_alive "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 20); do pid_alive "$pid" || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "  $1 stopped (pid $pid)"
  fi
  rm -f "$2"
}
