"""Benchmark: generation and ingestion time and peak memory, against plain CSV reads of the same file.

    .venv/bin/python bench/ingest.py --scale small          # generate (with one drop week), then ingest
    .venv/bin/python bench/ingest.py --raw /path/to/hm-csvs  # an existing dataset (real Kaggle or full scale)

Every step runs in its own fresh interpreter and reports its own peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``: threads and native allocations
included), so steps do not inherit each other's memory. Baselines, measured
in the same run on the same transactions file: the baseline is the bare
streaming parse (``pyarrow.csv.open_csv`` over raw bytes, nothing kept:
the floor for any streaming ingest); for comparison, whole-file reads into
memory with ``pyarrow.csv.read_csv`` and ``pandas.read_csv`` (skipped above
1 GiB unless ``--in-memory``: ~9 GiB of RAM at full scale). The target for
the full 3.3 GB file is an ingest peak RSS under 4 GiB.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from _measure import measure  # bench/ is the script's folder, so first on sys.path

ROOT = Path(__file__).resolve().parents[1]
RSS_TARGET_MIB = 4096

_INGEST = "import hm_recsys.data.ingest"


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="small", help="generator scale when --raw is not given (tiny, small, full)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--raw", type=Path, help="ingest this dataset instead of generating one")
    p.add_argument("--in-memory", action="store_true",
                   help="run the in-memory read_csv comparisons even on files over 1 GiB (~9 GiB RAM at full scale)")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed after)")
    args = p.parse_args(argv)

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=args.workdir) as tmp:
        work = Path(tmp)
        rows: list[tuple[str, dict]] = []
        if args.raw is None:
            raw = work / "raw"
            gen = measure(f"generate {args.scale}", f"""
                from hm_recsys.data.synthetic import generate
                generate({str(raw)!r}, scale={args.scale!r}, seed={args.seed}, progress=False, drop_weeks=1)
                extra = {{}}
            """, env, imports=_INGEST)
            rows.append((f"generate ({args.scale}, 1 drop week)", gen))
        else:
            raw = args.raw
        tx = raw / "transactions_train.csv"
        size = tx.stat().st_size

        base = measure("streaming parse", f"""
            import pyarrow as pa, pyarrow.csv as pcsv
            from hm_recsys.data import schema
            cols = schema.TRANSACTION_COLUMNS
            reader = pcsv.open_csv({str(tx)!r}, read_options=pcsv.ReadOptions(block_size=16 << 20),
                                   convert_options=pcsv.ConvertOptions(column_types={{c: pa.binary() for c in cols}}))
            extra = {{"rows": sum(b.num_rows for b in reader)}}
        """, env, imports=_INGEST)
        rows.append(("baseline: open_csv parse only", base))
        if size <= (1 << 30) or args.in_memory:
            rc = measure("pyarrow.csv.read_csv", f"""
                import pyarrow.csv as pcsv
                t = pcsv.read_csv({str(tx)!r})
                extra = {{"rows": t.num_rows}}
            """, env, imports=_INGEST)
            rows.append(("pyarrow.csv.read_csv (in memory)", rc))
            pdr = measure("pandas.read_csv", f"""
                import pandas as pd
                from hm_recsys.data import schema
                df = pd.read_csv({str(tx)!r}, **schema.read_csv_kwargs("transactions"))
                extra = {{"rows": len(df)}}
            """, env, imports=_INGEST)
            rows.append(("pandas.read_csv (in memory, strings)", pdr))

        wh = work / "warehouse"
        hist = measure("ingest_history", f"""
            from hm_recsys.data.ingest import ingest_history
            r = ingest_history({str(raw)!r}, {str(wh)!r}, progress=False)
            extra = {{"rows": r["rows"]["transactions"], "weeks": len(r["weeks"])}}
        """, env, imports=_INGEST)
        rows.append(("ingest_history (3 CSVs)", hist))
        drops = sorted((raw / "drops").glob("*.csv")) if (raw / "drops").is_dir() else []
        if drops:
            drop = measure("ingest_drop", f"""
                from hm_recsys.data.ingest import ingest_drop
                r = ingest_drop({str(drops[-1])!r}, {str(wh)!r})
                extra = {{"rows": r["rows"]}}
            """, env, imports=_INGEST)
            rows.append((f"ingest_drop ({drops[-1].name})", drop))
        wh_tx = du(wh / "transactions")

    print(f"\ntransactions_train.csv: {size / 2**20:,.1f} MiB, {base['rows']:,} rows, {hist['weeks']} weeks")
    # CPU seconds next to wall seconds: on a shared machine the wall clock also measures the neighbours.
    print(f"{'step':<42}{'wall s':>8}{'CPU s':>8}{'rows/s':>11}{'peak RSS MiB':>14}"
          f"{'wall x base':>13}{'CPU x base':>12}{'RSS x base':>12}")
    for name, m in rows:
        rate = f"{m['rows'] / m['seconds']:,.0f}" if "rows" in m else "-"
        print(
            f"{name:<42}{m['seconds']:>8.2f}{m['cpu']:>8.2f}{rate:>11}{m['peak_mib']:>14,.0f}"
            f"{m['seconds'] / base['seconds']:>13.2f}{m['cpu'] / base['cpu']:>12.2f}"
            f"{m['peak_mib'] / base['peak_mib']:>12.2f}"
        )
    print(f"warehouse transactions on disk: {wh_tx / 2**20:,.1f} MiB = {wh_tx / size:.3f} x the CSV")
    full_rows = 31_788_324
    verdict = "OK" if hist["peak_mib"] < RSS_TARGET_MIB else "OVER"
    print(f"ingest peak RSS {hist['peak_mib']:,.0f} MiB vs target {RSS_TARGET_MIB:,} MiB for the full file: {verdict}"
          + ("" if base["rows"] >= full_rows else f" (measured at {base['rows']:,} rows, not full scale)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
