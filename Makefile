# hm-recsys: the two commands a new user needs are `make demo` and `make test`.
# Everything runtime (data, MLflow, Airflow, BentoML) lives under $(HM_RECSYS_HOME).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HM_RECSYS_HOME ?= $(CURDIR)/var
export AIRFLOW_HOME ?= $(HM_RECSYS_HOME)/airflow
export BENTOML_HOME ?= $(HM_RECSYS_HOME)/bentoml
export MLFLOW_DISABLE_TELEMETRY := true
export BENTOML_DO_NOT_TRACK := true
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := false
export PYTHONUNBUFFERED := 1

SCALE ?= small
SEED ?= 42

.PHONY: help setup demo test prod-local test-fast bench bench-quality lock clean distclean airflow mlflow serve stop status

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv with the locked environment and the package (editable)

$(STAMP): requirements.lock docker/requirements-prod.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet -r docker/requirements-prod.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

demo: setup  ## end to end: generate, ingest, retrain through Airflow twice (promote, refuse), serve, query
	SCALE=$(SCALE) SEED=$(SEED) scripts/demo.sh

test: setup  ## run the whole test suite
	$(BIN)/python -m pytest -q

test-fast: setup  ## unit and data tests only (no services)
	$(BIN)/python -m pytest -q -m "not integration and not slow"

bench: setup  ## all benchmarks at SCALE (figures printed as ratios against in-run baselines)
	$(BIN)/python bench/generate.py --scale $(SCALE)
	$(BIN)/python bench/ingest.py --scale $(SCALE)
	$(BIN)/python bench/validate.py --scale $(SCALE)
	$(BIN)/python bench/train.py
	$(BIN)/python bench/evaluate.py
	$(BIN)/python bench/serve.py --scale $(if $(filter tiny,$(SCALE)),tiny,small)
	$(BIN)/python bench/quality.py --data $(if $(filter tiny,$(SCALE)),tiny,small)
	$(BIN)/python bench/freshness.py --data $(if $(filter tiny,$(SCALE)),tiny,small)
	$(BIN)/python bench/dag_parse.py
	$(BIN)/python bench/dag_full.py --scale $(SCALE)
	$(BIN)/python bench/index.py --home var/bench/dag_full-$(SCALE)

bench-quality: setup  ## quality on the real dev set (MovieLens-100k, the recbole wheel fetched from PyPI) and on small data
	$(BIN)/python bench/quality.py --data movielens --fetch
	$(BIN)/python bench/quality.py --data small

airflow: setup  ## start Airflow (api-server, scheduler, dag-processor, triggerer) on 127.0.0.1:8080
	scripts/stack.sh start airflow

serve: setup  ## start the recommendation service (the champion) on 127.0.0.1:3000
	scripts/stack.sh start serve

mlflow: setup  ## start the MLflow UI on 127.0.0.1:5000
	scripts/stack.sh start mlflow

prod-local: setup  ## the production topology on this machine: Celery workers, Redis, Postgres, MLflow server
	scripts/prodstack.sh start

stop:  ## stop everything `make airflow/mlflow/serve/prod-local` started (by PID)
	scripts/stack.sh stop

status:  ## what is running
	scripts/stack.sh status

lock:  ## re-resolve dependencies and rewrite requirements.lock
	rm -rf /tmp/hm-recsys-lock && $(PYTHON) -m venv /tmp/hm-recsys-lock
	/tmp/hm-recsys-lock/bin/pip install --quiet --upgrade pip
	/tmp/hm-recsys-lock/bin/pip install --quiet torch==2.13.0 -e '.[dev]'
	{ head -3 requirements.lock; /tmp/hm-recsys-lock/bin/pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean: stop  ## stop services and remove runtime state (var/)
	rm -rf $(HM_RECSYS_HOME)

distclean: clean  ## also remove the virtualenv
	rm -rf $(VENV)
