"""Weekly transaction drops: validate with Great Expectations, ingest or quarantine.

Wiring only: every task is a local import and one call into
``hm_recsys.pipeline``. Parsing this file imports nothing but Airflow's SDK.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Asset, dag, get_current_context, task

# Emitted when at least one drop was accepted into the warehouse.
TRANSACTIONS = Asset("hm_recsys_transactions")

DOC = """
# hm_ingest: incoming drops -> warehouse or quarantine

Put weekly transaction files in H&M's format into `var/data/incoming/`, named
`transactions_<YYYY-MM-DD>.csv` after the Wednesday that starts their H&M week.
Runs hourly and on demand.

| task | contract |
|---|---|
| `process_drops` | validates every file in the incoming folder (Great Expectations suites: structure, formats, value sets, ranges, referential integrity, dates inside the declared week and not after this run, volume vs recent weeks). Accepted drops become their own warehouse partitions (idempotent by content hash) and move to `processed/`; rejected ones move byte for byte to `quarantine/<drop>/` with `report.json` and Data Docs. Returns one outcome per drop (paths and counts). Skips when the folder is empty. |
| `publish` | emits the `hm_recsys_transactions` Asset event when something was accepted. |
| `fail_on_rejects` | fails the run, loudly, naming each quarantined drop and why, so a rejected drop is never silent. Accepted drops of the same run stay ingested. |
"""


@dag(
    dag_id="hm_ingest",
    schedule="@hourly",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    doc_md=DOC,
    tags=["hm-recsys", "data"],
    default_args={"retries": 1, "retry_delay": dt.timedelta(minutes=2)},
)
def hm_ingest():
    @task(doc_md="Validate each incoming drop; ingest it or quarantine it.")
    def process_drops() -> list[dict]:
        from hm_recsys import pipeline

        ctx = get_current_context()
        return pipeline.process_drops(run_id=ctx["run_id"], run_date=pipeline.run_date(ctx))

    @task.short_circuit(ignore_downstream_trigger_rules=False, doc_md="Continue only if a drop was accepted.")
    def any_accepted(outcomes: list[dict]) -> bool:
        return any(o["status"] == "accepted" for o in outcomes)

    @task(outlets=[TRANSACTIONS], doc_md="Announce new data (Asset event).")
    def publish(outcomes: list[dict]) -> list[str]:
        return [o["file"] for o in outcomes if o["status"] == "accepted"]

    @task(doc_md="Fail the run if any drop was quarantined.")
    def fail_on_rejects(outcomes: list[dict]) -> None:
        from hm_recsys import pipeline

        pipeline.fail_on_rejects(outcomes)

    outcomes = process_drops()
    any_accepted(outcomes) >> publish(outcomes)
    fail_on_rejects(outcomes)


hm_ingest()
