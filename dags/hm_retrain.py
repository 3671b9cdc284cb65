"""Weekly retraining of the H&M two-tower model, gated on Recall@12.

Wiring only: every task is a local import and one call into
``hm_recsys.pipeline``. Parsing this file imports nothing but Airflow's SDK.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Param, dag, get_current_context, task

DOC = """
# hm_retrain: weekly retraining with a champion/challenger gate against every heuristic

Runs every Wednesday 06:00 UTC (an H&M week closes on Tuesday) and on demand
from **Trigger DAG w/ config**. Manual runs need no logical date: the holdout
week defaults to the last complete week in the warehouse.

| task | reads | writes / returns (XCom: ids and paths only) |
|---|---|---|
| `validate_incoming` | `var/data/incoming/` | pending drops validated (Great Expectations) and ingested, or quarantined: a rejected drop fails the run here, before any training |
| `check_data` | warehouse | the split (train / validation week(s) / holdout week) and the features' history lookback; fails if weeks are missing |
| `build_snapshot` | warehouse | a frozen, hard-linked copy of every partition the run reads (history lookback included) under `var/runs/<run>/snapshot`, and its content hash |
| `train` | snapshot | the towers and the fusion of candidate sources (fitted on the validation weeks); an MLflow run (params, fusion, per-epoch metrics, plots, model) and the bundle path; the holdout is left to `evaluate`; a retry reuses a finished run |
| `register` | MLflow run | a model version of `hm-recsys-two-tower`, alias `challenger`; idempotent on this Airflow run id |
| `build_index` | bundle | the challenger's served state as of the holdout's start: candidate tables and a ScaNN index whose search setting is the cheapest keeping >= 0.99 x exact search's holdout recall (version tag `index_search`, which later served states start from) |
| `evaluate` | holdout week | challenger vs champion, each as served, vs every heuristic (vs oracle); the gate's decision and the rule that decided as version tags; the challenger's holdout metrics (served, towers alone, lifts, Recall@K plot) logged to its training run |
| `gate` | decision | branches to `promote` or `keep_champion` |
| `promote` → `deploy` | registry | compare-and-set of alias `champion` on the judged champion (old one `previous-champion`), then the state as of the newest week published, a Bento built and the running service hot-swapped |
| `keep_champion` | decision | nothing changes; the reason is in the task log and on the version's tags |
| `report` | all of the above | the comparison table in the log |

**Params**: `train_weeks`, `epochs`, `gate_margin` (relative Recall@12 lift the
challenger must show), `holdout_week` (YYYY-MM-DD, any day of the week),
`overrides` (model config `section.key=value` lines, e.g. `train.temperature=0.1`), `force_promote` + `force_reason`
(a reason is required; it is recorded on the version).
"""


@dag(
    dag_id="hm_retrain",
    schedule="0 6 * * 3",
    start_date=dt.datetime(2026, 1, 7, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    doc_md=DOC,
    tags=["hm-recsys", "training"],
    default_args={
        "retries": 2,
        "retry_delay": dt.timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=15),
    },
    params={
        "train_weeks": Param(12, type="integer", minimum=1, maximum=104, title="Training weeks",
                             description="Weeks of transactions before the validation week."),
        "epochs": Param(None, type=["null", "integer"], minimum=1, maximum=100, title="Epochs",
                        description="Empty: the model config's default (with early stopping)."),
        "gate_margin": Param(0.02, type="number", minimum=0, maximum=1, title="Gate margin",
                             description="Relative Recall@12 lift over the champion needed to promote (0.02 = 2%)."),
        "holdout_week": Param(None, type=["null", "string"], format="date", title="Holdout week",
                              description="Any day of the H&M week to score on. Empty: last complete week."),
        "overrides": Param([], type="array", items={"type": "string"}, title="Config overrides",
                           description="Model config overrides, one section.key=value per line (e.g. train.temperature=0.1)."),
        "force_promote": Param(False, type="boolean", title="Force promote",
                               description="Promote even if the gate says no. Requires a reason."),
        "force_reason": Param(None, type=["null", "string"], title="Force reason",
                              description="Why the gate is overridden; recorded on the model version."),
    },
)
def hm_retrain():
    @task(retries=0, doc_md="Take in pending drops (validate, ingest or quarantine); fail on any reject.")
    def validate_incoming() -> list[dict]:
        from hm_recsys import pipeline

        ctx = get_current_context()
        outcomes = pipeline.process_drops(run_id=ctx["run_id"], run_date=pipeline.run_date(ctx))
        pipeline.fail_on_rejects(outcomes)
        return outcomes

    @task(doc_md="Derive and check the split; fail before any training if data is missing.")
    def check_data() -> dict:
        from hm_recsys import pipeline

        ctx = get_current_context()
        return pipeline.check_data(ctx["params"], run_id=ctx["run_id"])

    @task(doc_md="Freeze exactly the split's partitions (hard links) so a retry trains on the same bytes.")
    def build_snapshot(checked: dict) -> dict:
        from hm_recsys import pipeline

        return pipeline.build_snapshot(checked, run_id=get_current_context()["run_id"])

    @task(retries=1, execution_timeout=dt.timedelta(hours=3),
          doc_md="Train the towers on the snapshot; log the MLflow run. A retry reuses a finished run.")
    def train(snapshot: dict) -> dict:
        from hm_recsys import pipeline

        ctx = get_current_context()
        return pipeline.train(snapshot, ctx["params"], run_id=ctx["run_id"])

    @task(doc_md="Register the model version (alias challenger); idempotent on the Airflow run id.")
    def register(trained: dict) -> dict:
        from hm_recsys import pipeline

        return pipeline.register(trained, run_id=get_current_context()["run_id"])

    @task(doc_md="Build the challenger's served state (candidate tables, ScaNN index with its recall floor) as of the holdout.")
    def build_index(registered: dict) -> dict:
        from hm_recsys import pipeline

        return pipeline.build_index(registered, run_id=get_current_context()["run_id"])

    @task(doc_md="Score challenger and champion as served, and every heuristic, on the same holdout; decide.")
    def evaluate(indexed: dict) -> dict:
        from hm_recsys import pipeline

        ctx = get_current_context()
        return pipeline.evaluate(indexed, ctx["params"], run_id=ctx["run_id"])

    @task.branch(doc_md="Follow the gate's decision.")
    def gate(decision: dict) -> str:
        return "promote" if decision["promote"] else "keep_champion"

    @task(doc_md="Move alias champion to the challenger, compare-and-set on the judged champion.")
    def promote(decision: dict) -> dict:
        from hm_recsys import pipeline

        return pipeline.promote(decision)

    @task(doc_md="Publish the champion's state as of the newest week, build a Bento, hot-swap the running service.")
    def deploy(promoted: dict) -> dict:
        from hm_recsys import pipeline

        return pipeline.deploy(promoted)

    @task(doc_md="The gate said no: keep the champion and say why.")
    def keep_champion(decision: dict) -> dict:
        from hm_recsys import pipeline

        return pipeline.keep_champion(decision)

    @task(trigger_rule="none_failed_min_one_success", doc_md="Print the comparison table and where to look.")
    def report(decision: dict) -> dict:
        from hm_recsys import pipeline

        return pipeline.report(decision)

    checked = check_data()
    validate_incoming() >> checked
    decision = evaluate(build_index(register(train(build_snapshot(checked)))))
    promoted = promote(decision)
    kept = keep_champion(decision)
    gate(decision) >> [promoted, kept]
    deployed = deploy(promoted)
    done = report(decision)
    [deployed, kept] >> done


hm_retrain()
