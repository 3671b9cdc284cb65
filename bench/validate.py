"""Benchmark: Great Expectations validation of one weekly drop and of the full history, time and peak memory.

    .venv/bin/python bench/validate.py --scale small                 # generate (1 drop week), ingest, measure
    nice -n 10 .venv/bin/python bench/validate.py --scale full --out /tmp/me/full --keep
    .venv/bin/python bench/validate.py --raw DIR [--warehouse DIR]   # an existing dataset with drops/

Every step runs in its own fresh interpreter and reports its own wall time,
CPU time and peak RSS (``getrusage(RUSAGE_SELF)``), so steps do not inherit
each other's memory. GX is imported and its context created *before* the
clock starts (that one-off cost, ~5 s, is reported on its own line): the
figures are the validation work. Baselines, measured in the same run on the
same files:

* drop: ``pandas.read_csv`` of the drop with the contract's read arguments
  (all strings, no NA conversion): what merely loading the file costs;
* history: the bare streaming parse of the three CSVs (``pyarrow.csv.open_csv``
  over raw bytes, nothing kept): the floor of any pass over the files.

Targets (issue 3): one full-scale weekly drop (~300k rows) validates in well
under a minute; the full history (31.8M rows) is feasible on this 2-core,
24 GiB machine: peak RSS stays far below the RAM (target < 4 GiB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _measure import measure  # bench/ is the script's folder, so first on sys.path

ROOT = Path(__file__).resolve().parents[1]
RSS_TARGET_MIB = 4096

_GX = "from hm_recsys.data import validate as V\nrunner = V.GxRunner.shared()"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="small", choices=["tiny", "small", "full"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--raw", type=Path, help="an existing dataset (the three CSVs and drops/ or oracle/)")
    p.add_argument("--warehouse", type=Path, help="its warehouse (default: ingest the history into --out)")
    p.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed unless --keep)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--run-date", default="2020-09-30")
    args = p.parse_args(argv)

    out = args.out or Path(tempfile.mkdtemp(prefix="hm-bench-validate-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        "GX_ANALYTICS_ENABLED": "false",
        "HM_RECSYS_HOME": str(out / "var"),  # nothing lands in $HOME or the repo's var/
    }
    try:
        raw = args.raw or out / "raw"
        if args.raw is None and not (raw / "transactions_train.csv").is_file():
            measure(f"generate {args.scale}", f"""
                from hm_recsys.data.synthetic import generate
                generate(Path({str(raw)!r}), scale={args.scale!r}, seed={args.seed}, progress=False, drop_weeks=1)
                extra = {{}}
            """, env)
        drops = sorted((raw / "drops").glob("transactions_*.csv"))
        drop, week = (drops[-1], None) if drops else (raw / "oracle" / "future_transactions.csv", "2020-09-23")
        wh = args.warehouse or out / "warehouse"
        if args.warehouse is None and not (wh / "articles.parquet").is_file():
            measure("ingest history", f"""
                from hm_recsys.data.ingest import ingest_history
                ingest_history(Path({str(raw)!r}), Path({str(wh)!r}), progress=False)
                extra = {{}}
            """, env)
        drop_rows = drop.read_bytes().count(b"\n") - 1
        run_date = args.run_date

        gx = measure("GX import + context", """
            from hm_recsys.data import validate as V
            runner = V.GxRunner.shared()
            extra = {"gx_seconds": time.perf_counter() - t0}
        """, env)
        base_drop = measure("baseline: pandas.read_csv(drop)", f"""
            from hm_recsys.data import schema
            df = pandas.read_csv({str(drop)!r}, **schema.read_csv_kwargs("transactions"))
            extra = {{"rows": len(df)}}
        """, env, imports="from hm_recsys.data import schema")
        val_drop = measure("validate_drop", f"""
            r = V.validate_drop(Path({str(drop)!r}), Path({str(wh)!r}), dt.date.fromisoformat({run_date!r}),
                                week={week!r}, runner=runner)
            extra = {{"status": r.status, "failed": r.failed_checks, "rows": r.rows, "timings": r.timings}}
        """, env, imports=_GX)
        files = [str(raw / n) for n in ("articles.csv", "customers.csv", "transactions_train.csv")]
        base_hist = measure("baseline: streaming parse of the 3 CSVs", f"""
            rows = 0
            for f in {files!r}:
                names = open(f, "rb").readline().decode().strip().split(",")
                r = pyarrow.csv.open_csv(f, read_options=pyarrow.csv.ReadOptions(block_size=16 << 20),
                    parse_options=pyarrow.csv.ParseOptions(newlines_in_values=f.endswith("articles.csv")),
                    convert_options=pyarrow.csv.ConvertOptions(column_types={{c: pyarrow.binary() for c in names}}))
                for b in r:
                    rows += b.num_rows
            extra = {{"rows": rows}}
        """, env)
        val_hist = measure("validate_history", f"""
            r = V.validate_history(Path({str(raw)!r}), dt.date.fromisoformat({run_date!r}), runner=runner,
                                   progress=False)
            extra = {{"status": r.status, "failed": [c.table + "." + c.check for c in r.failures], "rows": r.rows,
                      "batches": r.batches, "weeks": len(r.weeks)}}
        """, env, imports=_GX)
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(out, ignore_errors=True)

    def row(label, m, base=None):
        ratio = f"{m['seconds'] / base['seconds']:7.1f}x" if base else "        "
        mem = f"{m['peak_mib'] / base['peak_mib']:5.1f}x" if base else "      "
        print(f"  {label:<44} {m['seconds']:8.1f} s {m['cpu']:8.1f} s cpu {ratio}   {m['peak_mib']:8.0f} MiB {mem}")

    hist_rows = sum(val_hist["rows"].values())
    print(f"validation figures ({raw}; drop {drop.name}: {drop_rows:,} rows; history: {hist_rows:,} rows, "
          f"{val_hist['weeks']} weeks)")
    print(f"  {'step':<44} {'wall':>10} {'cpu':>12} {'vs base':>8}   {'peak RSS':>12} {'vs base':>6}")
    print(f"  {'GX import + ephemeral context (once)':<44} {gx['gx_seconds']:8.1f} s")
    row("baseline: pandas.read_csv(drop)", base_drop)
    row(f"validate one drop ({val_drop['status']})", val_drop, base_drop)
    tm = val_drop["timings"]
    print(f"    of which: warehouse reference {tm['reference']:.1f} s, reading + structure {tm['read']:.1f} s, "
          f"GX suites {tm['gx']:.1f} s")
    row("baseline: streaming parse of the 3 CSVs", base_hist)
    row(f"validate the history ({val_hist['status']}, {val_hist['batches']} GX runs)", val_hist, base_hist)
    print(f"  drop throughput: {drop_rows / val_drop['seconds']:,.0f} rows/s; history: "
          f"{hist_rows / val_hist['seconds']:,.0f} rows/s")
    peak = max(val_drop["peak_mib"], val_hist["peak_mib"])
    print(f"  peak RSS target < {RSS_TARGET_MIB} MiB: {'OK' if peak < RSS_TARGET_MIB else 'MISSED'} ({peak:.0f} MiB)")
    for name, m in (("drop", val_drop), ("history", val_hist)):
        if m["failed"]:
            print(f"  note: the {name} failed {m['failed']} (expected none on generated data)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
