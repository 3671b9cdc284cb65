"""Drift of a weekly drop against the training window (``hm_recsys.data.drift``) and its place in a drop's life.

The tiny dataset's first drop week (2020-08-26, not in the history
warehouse) is the clean drop; each test changes one thing about it and
asserts the exact verdict of every metric: the changed one must move, the
others must not. The statistics are also recomputed here from the warehouse
with pandas/scipy, so a wrong definition (wrong window, wrong "new") fails.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from hm_recsys.data import drift as DR
from hm_recsys.data import drops as D
from hm_recsys.data.warehouse import Warehouse
from tests.data.bad_inputs import corpus
from tests.data.bad_inputs.fixtures import tiny_drops

WEEK = corpus.BASE_WEEK  # 2020-08-26: the first held-back week
ALL_OK = dict.fromkeys(DR.METRICS, "ok")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_drops(tmp_path_factory)


@pytest.fixture(scope="module")
def wh(tiny) -> Warehouse:
    return Warehouse(tiny.warehouse)  # read-only here


@pytest.fixture(scope="module")
def clean(tiny) -> pd.DataFrame:
    return DR.read_drop(tiny.raw / "drops" / f"transactions_{WEEK}.csv")


@pytest.fixture(scope="module")
def articles(wh) -> pd.DataFrame:
    return pq.read_table(wh.paths.articles, columns=["article_id", "index_group_name", "product_type_name"]).to_pandas()


def report(df, wh, **kw) -> dict:
    r = DR.drift_report(df, WEEK, wh, config=kw.pop("config", DR.DriftConfig()), **kw)
    json.loads(json.dumps(r, allow_nan=False))  # JSON-able, no NaN
    return r


def verdicts(r: dict) -> dict[str, str]:
    return {k: m["verdict"] for k, m in r["metrics"].items()}


# ------------------------------------------------------------------------------------------------
# Verdicts
# ------------------------------------------------------------------------------------------------
def test_a_clean_generated_week_is_ok(clean, wh):
    r = report(clean, wh)
    assert (r["verdict"], verdicts(r)) == ("ok", ALL_OK), r["summary"]
    weeks = [dt.date.fromisoformat(w) for w in r["reference"]["weeks"]]
    assert weeks == [WEEK - dt.timedelta(weeks=k) for k in range(12, 0, -1)]  # the 12 weeks right before
    assert r["reference"]["note"] is None and r["drop"]["rows"] == len(clean)
    assert r["summary"].startswith("drift OK vs 12 reference week(s) 2020-06-03..2020-08-19: price ok (KS ")
    for m in r["metrics"].values():
        assert set(m) >= {"statistic", "test", "value", "p_value", "reference", "drop", "thresholds", "baseline"}
        assert m["thresholds"]["warn"] <= m["thresholds"]["drift"] and len(m["baseline"]["values"]) >= 4


def test_prices_times_three_drift_on_price_only(clean, wh):
    df = clean.assign(price=clean["price"].astype(float) * 3)
    r = report(df, wh)
    assert verdicts(r) == {**ALL_OK, "price": "drift"} and r["verdict"] == "drift"
    assert r["metrics"]["price"]["value"] > 0.25 and r["summary"].startswith("drift DRIFT")
    assert r["metrics"]["price"]["drop"]["median"] == pytest.approx(3 * r["metrics"]["price"]["reference"]["median"],
                                                                     rel=0.5)


def test_all_sales_in_stores_drift_on_channel_only(clean, wh):
    r = report(clean.assign(sales_channel_id="1"), wh)
    assert verdicts(r) == {**ALL_OK, "channel": "drift"} and r["verdict"] == "drift"
    m = r["metrics"]["channel"]
    assert m["drop"]["shares"] == {"1 store": 1.0, "2 online": 0.0}
    assert m["value"] == pytest.approx(m["reference"]["shares"]["2 online"])  # TVD = the online share lost


def _never_bought(wh: Warehouse, before: dt.date) -> list[str]:
    table = pq.read_table(wh.paths.customers, columns=["customer_id"]).column(0).to_pylist()
    seen = set(wh.transactions(dt.date(2000, 1, 5), before, columns=["customer_id"])["customer_id"].astype(str))
    return sorted(c for c in table if c not in seen)


def test_buyers_who_never_bought_before_drift_on_new_customers_only(clean, wh):
    never = _never_bought(wh, WEEK)
    assert len(never) > 20  # customers in the table who never bought: legitimate ids, none seen before
    old = clean["customer_id"].unique()
    df = clean.assign(customer_id=clean["customer_id"].map({c: never[i % len(never)] for i, c in enumerate(old)}))
    r = report(df, wh)
    assert verdicts(r) == {**ALL_OK, "new_customers": "drift"} and r["verdict"] == "drift"
    m = r["metrics"]["new_customers"]
    assert m["drop"] == {"customers": min(len(old), len(never)), "new": min(len(old), len(never)), "share": 1.0}


def test_one_index_group_only_drifts_on_the_category_mix(clean, wh, articles):
    group = articles.set_index("article_id")["index_group_name"].astype(str)
    df = clean[clean["article_id"].map(group) == "Ladieswear"]
    r = report(df, wh)
    assert r["metrics"]["index_group"]["verdict"] == "drift" and r["verdict"] == "drift"
    shares = {s["name"]: s["drop"] for s in r["metrics"]["index_group"]["shares"]}
    assert shares["Ladieswear"] == 1.0 and sum(shares.values()) == 1.0
    assert r["metrics"]["channel"]["verdict"] == "ok" and r["metrics"]["new_customers"]["verdict"] == "ok"


def test_no_reference_week_is_a_verdict_not_an_exception(clean, wh, tmp_path):
    empty = tmp_path / "catalogue_only"
    empty.mkdir()
    for p in (wh.paths.articles, wh.paths.customers):
        shutil.copy(p, empty / p.name)
    for root in (empty, tmp_path / "no_warehouse_at_all"):
        r = report(clean, Warehouse(root))
        assert r["verdict"] == "no-reference" and set(verdicts(r).values()) == {"no-reference"}
        assert r["reference"]["weeks"] == [] and "no week before 2020-08-26" in r["reference"]["note"]
        assert r["metrics"]["price"]["drop"]["rows"] == len(clean)  # the drop's side is still described
        assert DR.plot_drift(r, tmp_path / f"{root.name}.png").read_bytes()[:8] == PNG


def test_a_short_warehouse_uses_the_weeks_it_has_and_says_so(clean, wh, tmp_path):
    short = shutil.copytree(wh.root, tmp_path / "warehouse")
    weeks = Warehouse(short).weeks()
    for w in weeks[:-3]:
        shutil.rmtree(Warehouse(short).paths.week_dir(w))
    r = report(clean, Warehouse(short))
    assert r["reference"]["weeks"] == [w.isoformat() for w in weeks[-3:]]
    assert "only 3 week(s) before 2020-08-26" in r["reference"]["note"]
    # 3 weeks of history: every id looks new, so the novelty shares have no reference (and no false alarm)
    assert r["metrics"]["new_customers"]["verdict"] == r["metrics"]["new_articles"]["verdict"] == "no-reference"
    # fewer than baseline_min_weeks reference weeks: no "unusual" gate, thresholds and significance decide
    assert r["metrics"]["price"]["baseline"] is None and r["metrics"]["price"]["verdict"] == "ok"


def test_small_noisy_changes_are_held_by_the_gates(clean, wh):
    """A threshold crossed by a handful of rows is not significant; one within the weeks' own spread is usual."""
    r = report(clean.head(20).assign(sales_channel_id=["1", "2"] * 10), wh)  # half in stores instead of ~30%
    m = r["metrics"]["channel"]
    assert m["value"] > 0.1 and m["p_value"] >= 1e-3 and m["verdict"] == "ok" and "not significant" in m["note"]
    low = DR.DriftConfig(index_group=(0.0001, 0.0002))  # any mix change crosses these thresholds
    m = report(clean, wh, config=low)["metrics"]["index_group"]
    assert m["value"] <= m["baseline"]["limit"] and m["verdict"] == "ok" and "own variation" in m["note"]


# ------------------------------------------------------------------------------------------------
# Definitions, recomputed independently
# ------------------------------------------------------------------------------------------------
def test_statistics_match_an_independent_computation(clean, wh):
    from scipy.stats import ks_2samp
    from scipy.spatial.distance import jensenshannon

    r = report(clean, wh)
    ref = wh.transactions(WEEK - dt.timedelta(weeks=12), WEEK)
    drop_p = clean["price"].astype(float).to_numpy()
    ks = ks_2samp(drop_p, ref["price"].to_numpy())
    assert r["metrics"]["price"]["value"] == pytest.approx(ks.statistic)
    assert r["metrics"]["price"]["reference"]["rows"] == len(ref) == r["reference"]["rows"]
    online = (clean["sales_channel_id"] == "2").mean() - (ref["sales_channel_id"] == 2).mean()
    assert r["metrics"]["channel"]["value"] == pytest.approx(abs(online))
    arts = pq.read_table(wh.paths.articles, columns=["article_id", "index_group_name"]).to_pandas()
    group = arts.set_index("article_id")["index_group_name"].astype(str)
    a = ref["article_id"].astype(str).map(group).value_counts(normalize=True)
    b = clean["article_id"].map(group).value_counts(normalize=True)
    names = sorted(set(a.index) | set(b.index))
    js = jensenshannon(a.reindex(names, fill_value=0), b.reindex(names, fill_value=0), base=2)
    assert r["metrics"]["index_group"]["value"] == pytest.approx(js)


def test_new_shares_are_against_the_whole_history_and_each_reference_week_against_its_own_past(clean, wh):
    r = report(clean, wh)
    tx = wh.transactions(dt.date(2000, 1, 5), WEEK, columns=["customer_id", "article_id"])
    tx["week"] = wh.transactions(dt.date(2000, 1, 5), WEEK, columns=["t_dat"])["t_dat"].dt.date.map(
        lambda d: d - dt.timedelta(days=(d.weekday() - 2) % 7))
    seen = set(tx["customer_id"].astype(str))
    buyers = set(clean["customer_id"])
    m = r["metrics"]["new_customers"]
    assert m["drop"]["new"] == len(buyers - seen) and m["drop"]["customers"] == len(buyers)
    first = tx.groupby(tx["customer_id"].astype(str), observed=True)["week"].min()
    for w in m["weeks"]:
        week = dt.date.fromisoformat(w["week"])
        in_week = set(tx.loc[tx["week"] == week, "customer_id"].astype(str))
        assert w["customers"] == len(in_week) and w["new"] == int((first[sorted(in_week)] == week).sum())
    assert m["reference"]["mean"] == pytest.approx(np.mean([w["share"] for w in m["weeks"]]))
    assert m["delta"] == pytest.approx(m["drop"]["share"] - m["reference"]["mean"])
    assert m["value"] == max(0.0, m["delta"])  # one-sided: fewer new buyers than usual is no risk


def test_articles_missing_from_the_table_count_as_unknown(clean, wh, articles):
    kept = articles[articles["index_group_name"] != "Sport"]
    r = report(clean, wh, articles=kept)
    sport = set(articles.loc[articles["index_group_name"] == "Sport", "article_id"])
    share = clean["article_id"].isin(sport).mean()
    for name in ("index_group", "product_type"):
        assert r["metrics"][name]["drop"]["unknown_share"] == pytest.approx(share)
        assert "unknown" in {s["name"] for s in r["metrics"][name]["shares"]}
    assert "Sport" not in {s["name"] for s in r["metrics"]["index_group"]["shares"]}
    assert r["metrics"]["index_group"]["verdict"] == "ok"  # the same articles are unknown on both sides


# ------------------------------------------------------------------------------------------------
# Config, errors, plot
# ------------------------------------------------------------------------------------------------
def test_config_comes_from_the_environment_when_asked(monkeypatch):
    assert DR.DriftConfig.from_env({}) == DR.DriftConfig()
    c = DR.DriftConfig.from_env({"HM_RECSYS_DRIFT_REFERENCE_WEEKS": "8", "HM_RECSYS_DRIFT_PRICE": "0.2, 0.4",
                                 "HM_RECSYS_DRIFT_ALPHA": "0.01"})
    assert (c.reference_weeks, c.price, c.alpha) == (8, (0.2, 0.4), 0.01)
    for bad in ({"HM_RECSYS_DRIFT_PRICE": "0.3"}, {"HM_RECSYS_DRIFT_CHANNEL": "0.2,0.1"},
                {"HM_RECSYS_DRIFT_REFERENCE_WEEKS": "0"}):
        with pytest.raises(ValueError):
            DR.DriftConfig.from_env(bad)
    monkeypatch.setenv("HM_RECSYS_DRIFT_REFERENCE_WEEKS", "4")
    assert DR.DriftConfig.from_env().reference_weeks == 4  # read at call time, not at import


def test_a_drop_drift_cannot_read_is_an_error_verdict(tiny, tmp_path):
    for name, data in (("empty", b""), ("semicolons", b"t_dat;customer_id;article_id;price;sales_channel_id\n")):
        p = tmp_path / f"transactions_{WEEK}_{name}.csv"
        p.write_bytes(data)
        r = DR.drift_for_drop(p, WEEK, tiny.warehouse, DR.DriftConfig())
        assert r["verdict"] == "error" and r["error"] and r["summary"].startswith("drift ERROR: not computed (")
        assert DR.plot_drift(r, tmp_path / f"{name}.png").read_bytes()[:8] == PNG
    # no declared week: the week most of its dates fall in
    r = DR.drift_for_drop(tiny.raw / "drops" / f"transactions_{WEEK}.csv", None, tiny.warehouse, DR.DriftConfig())
    assert (r["week"], r["verdict"]) == (WEEK.isoformat(), "ok")


def test_the_plot_is_one_small_png(clean, wh, tmp_path):
    r = report(clean.assign(price=clean["price"].astype(float) * 3), wh)
    p = DR.plot_drift(r, tmp_path / "sub" / "drift.png")
    data = p.read_bytes()
    assert data[:8] == PNG and 10_000 < len(data) < 300_000


# ------------------------------------------------------------------------------------------------
# A drop's life: every validated drop gets the drift section and drift.png
# ------------------------------------------------------------------------------------------------
def _put(incoming: Path, name: str, data: bytes, order: int) -> None:
    p = incoming / name
    p.write_bytes(data)
    os.utime(p, (1_600_000_000 + order,) * 2)


def _clean_bytes(tiny) -> bytes:
    return (tiny.raw / "drops" / f"transactions_{WEEK}.csv").read_bytes()


def _times_three(data: bytes) -> bytes:
    head, *rows = data.decode().split("\n")
    out = [head] + [",".join([*r.split(",")[:3], f"{float(r.split(',')[3]) * 3:.16f}", r.split(",")[4]]) if r else r
                    for r in rows]
    return "\n".join(out).encode()


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """The clean first week (accepted) and the second week with prices x3 (rejected: price_range), one run."""
    root = tmp_path_factory.mktemp("drift_run")
    dirs = {k: root / k for k in ("incoming", "processed", "quarantine")}
    for p in dirs.values():
        p.mkdir()
    wh = tiny.warehouse_copy(root / "warehouse")
    _put(dirs["incoming"], f"transactions_{WEEK}.csv", _clean_bytes(tiny), 0)
    second = (tiny.raw / "drops" / f"transactions_{corpus.CRLF_WEEK}.csv").read_bytes()
    _put(dirs["incoming"], f"transactions_{corpus.CRLF_WEEK}.csv", _times_three(second), 1)
    res = D.process_incoming(dirs["incoming"], wh, dirs["processed"], dirs["quarantine"], corpus.RUN_DATE,
                             drift_config=DR.DriftConfig())
    return {"root": root, "dirs": dirs, "wh": wh, "res": res, "by_week": {d["week"]: d for d in res["drops"]}}


def test_accepted_and_rejected_drops_carry_drift_next_to_their_report(run):
    ok, bad = run["by_week"][WEEK.isoformat()], run["by_week"][corpus.CRLF_WEEK.isoformat()]
    assert (ok["status"], ok["ingest"], bad["status"], bad["failed_checks"]) == (
        "accepted", "ingested", "rejected", ["price_range"])  # drift changed nothing about acceptance
    # accepted: a report folder of its own (default: validation/drops/ beside processed/)
    folder = run["root"] / "validation" / "drops" / f"transactions_{WEEK}-{ok['sha256'][:12]}"
    assert (ok["report"], ok["drift_report"], ok["drift_plot"]) == (
        str(folder / "report.json"), str(folder / "report.json"), str(folder / "drift.png"))
    assert (bad["report"], bad["drift_report"], bad["drift_plot"]) == (
        str(Path(bad["quarantine"]) / "report.json"),) * 2 + (str(Path(bad["quarantine"]) / "drift.png"),)
    assert (ok["drift_verdict"], bad["drift_verdict"]) == ("ok", "drift")
    for out in (ok, bad):
        rep = json.loads(Path(out["report"]).read_text())
        assert rep["status"] == out["status"] and rep["sha256"] == out["sha256"]
        assert rep["drift"]["verdict"] == out["drift_verdict"] and rep["drift"]["plot"] == out["drift_plot"]
        assert Path(out["drift_plot"]).read_bytes()[:8] == PNG
        assert f"Drift vs 12 reference week(s): {out['drift_verdict'].upper()}" in out["summary"]
    rep = json.loads(Path(bad["report"]).read_text())
    assert rep["drift"]["metrics"]["price"]["verdict"] == "drift" and "price drift" in bad["summary"]
    assert json.loads(Path(ok["report"]).read_text())["moved_to"] == ok["moved_to"]
    # the second drop was measured against a reference that already holds the first one
    assert rep["drift"]["reference"]["weeks"][-1] == WEEK.isoformat()
    assert json.loads(json.dumps(run["res"])) == run["res"]  # outcomes stay small and JSON-able


def test_a_failing_drift_never_changes_a_drops_fate(tiny, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("statistics exploded")

    monkeypatch.setattr(DR, "drift_report", boom)
    dirs = {k: tmp_path / k for k in ("incoming", "processed", "quarantine")}
    for p in dirs.values():
        p.mkdir()
    wh = tiny.warehouse_copy(tmp_path / "warehouse")
    _put(dirs["incoming"], f"transactions_{WEEK}.csv", _clean_bytes(tiny), 0)
    reports = tmp_path / "reports"
    (out,) = D.process_incoming(dirs["incoming"], wh, dirs["processed"], dirs["quarantine"], corpus.RUN_DATE,
                                reports_dir=reports)["drops"]
    assert (out["status"], out["ingest"], out["drift_verdict"]) == ("accepted", "ingested", "error")
    assert Path(out["report"]).parent.parent == reports and Path(out["drift_plot"]).is_file()
    rep = json.loads(Path(out["report"]).read_text())
    assert rep["drift"]["error"] == "RuntimeError: statistics exploded"
    assert "Drift: ERROR, not computed (RuntimeError: statistics exploded)." in out["summary"]
    assert len(Warehouse(wh).part_files(WEEK)) == 1


def test_the_runtime_layout_puts_accepted_reports_under_validation_drops(tiny, home):
    from hm_recsys.config import Settings

    layout = Settings.from_env().layout
    tiny.warehouse_copy(layout.warehouse_dir)
    layout.incoming_dir.mkdir(parents=True)
    _put(layout.incoming_dir, f"transactions_{WEEK}.csv", _clean_bytes(tiny), 0)
    (out,) = D.validate_incoming(corpus.RUN_DATE)["drops"]
    assert Path(out["drift_report"]).parent.parent == layout.drop_reports_dir
    assert layout.drop_reports_dir == layout.data_dir / "validation" / "drops"
    assert D._default_reports_dir(layout.processed_dir) == layout.drop_reports_dir
