"""Refresh the champion's served state on every accepted drop, and watch its live quality.

Wiring only: every task is a local import and one call into
``hm_recsys.pipeline``. Parsing this file imports nothing but Airflow's SDK.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Asset, Param, dag, get_current_context, task

# hm_ingest emits it when at least one drop was accepted into the warehouse.
TRANSACTIONS = Asset("hm_recsys_transactions")

DOC = """
# hm_refresh: serve the newest week without retraining

Scheduled on the `hm_recsys_transactions` Asset: every accepted drop (an
`hm_ingest` run that ingested something) triggers it. Also runnable from
**Trigger DAG w/ config**, and as `hm-recsys refresh`.

| task | contract |
|---|---|
| `live_quality` | each newly ingested week is the ground truth for what was served during it: the champion's served state that was live then answers for that week's buyers, next to every heuristic baseline on the same customers. Recall@12 / MAP@12 go to the champion's MLflow monitoring run (`monitor v<version>`, step = week) with a plot, and the drop's drift statistics beside them. A week below the best heuristic is a warning (failure only with `fail_on_low_quality`). |
| `refresh_state` | with the champion's weights and fusion fixed, rebuilds its served state as of the newest week (histories, article statistics, customer + article embeddings, candidate tables, ScaNN index with its recall floor re-verified), writes it bound to (version, as_of) with a manifest and publishes it as `served/<as_of>/` of the version's MLflow run. One writer at a time (a lock, and this DAG runs one at a time); an older as_of never replaces a newer one. |
| `switch_service` | asks a running service to load it and waits until `/metadata` reports the version and as_of; the swap is atomic (zero failed requests). |

**Params**: `as_of` (YYYY-MM-DD, a Wednesday; empty = the day after the newest
ingested week), `fail_on_low_quality`.
"""


@dag(
    dag_id="hm_refresh",
    schedule=[TRANSACTIONS],
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    doc_md=DOC,
    tags=["hm-recsys", "serving"],
    default_args={"retries": 1, "retry_delay": dt.timedelta(minutes=1)},
    params={
        "as_of": Param(None, type=["null", "string"], format="date", title="As of",
                       description="A Wednesday. Empty: the day after the newest ingested week."),
        "fail_on_low_quality": Param(False, type="boolean", title="Fail on low live quality",
                                     description="Fail the run when the champion served below the best heuristic."),
    },
)
def hm_refresh():
    @task(doc_md="Score the served state that was live in each newly ingested week; log it to MLflow.")
    def live_quality() -> dict:
        from hm_recsys import pipeline

        return pipeline.live_quality(get_current_context()["params"])

    @task(doc_md="Rebuild and publish the champion's served state as of the newest week.")
    def refresh_state(quality: dict) -> dict:
        import datetime as dt

        from hm_recsys import pipeline

        as_of = get_current_context()["params"].get("as_of")
        return pipeline.refresh(as_of=dt.date.fromisoformat(as_of) if as_of else None, switch_service=False)

    @task(doc_md="Make the running service load the new state; wait until /metadata reports it.")
    def switch_service(refreshed: dict) -> dict:
        from hm_recsys import pipeline

        if refreshed.get("status") == "no-champion":
            return {"status": "no-champion"}
        return pipeline.switch(refreshed["version"], refreshed["as_of"])

    switch_service(refresh_state(live_quality()))


hm_refresh()
