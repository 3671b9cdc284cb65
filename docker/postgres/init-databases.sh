#!/usr/bin/env bash
# One role and one database per service, created once on an empty data volume.
#
# Mounted into /docker-entrypoint-initdb.d/ of the postgres container, which runs it
# as the superuser on first start only. Each service gets its own login role that owns
# only its database, so a leaked Airflow password does not open the MLflow registry.
# Passwords come from the environment (docker/.env), never from this file.
set -euo pipefail

: "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD is not set (docker/.env)}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set (docker/.env)}"

# psql's :'var' quoting keeps passwords out of the SQL text and safe to quote.
psql -v ON_ERROR_STOP=1 --no-psqlrc \
     --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
     -v airflow_pw="$AIRFLOW_DB_PASSWORD" -v mlflow_pw="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_pw';
CREATE DATABASE airflow OWNER airflow ENCODING 'UTF8';
REVOKE ALL ON DATABASE airflow FROM PUBLIC;

CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow ENCODING 'UTF8';
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
SQL
echo "init-databases: created roles and databases airflow, mlflow"
