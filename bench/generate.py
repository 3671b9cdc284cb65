"""Benchmark: synthetic H&M generation time and peak memory, against plain CSV writing measured in the same run.

    .venv/bin/python bench/generate.py                  # small scale (~10 s)
    .venv/bin/python bench/generate.py --scale full     # the benchmark scale (minutes; use nice)
    .venv/bin/python bench/generate.py --scale full --out /tmp/me/full --keep

The generator runs in a child process so its peak RSS is measured alone
(``resource.getrusage(RUSAGE_CHILDREN)``). Baselines, measured on this
machine in this run on rows of the very file just generated:

* pandas: ``DataFrame.to_csv`` of one average week of transaction rows,
  extrapolated to all rows (what a straightforward generator would at least pay
  just to write its output);
* pyarrow: ``pyarrow.csv.write_csv`` of the same week, extrapolated (the raw
  write speed the generator itself uses).

Targets (issue "Foundation"): full scale under 15 minutes on 2 cores, never
holding all rows in memory (peak RSS well below the 24 GiB machine; the
transactions CSV alone is ~3.3 GB of text at full scale).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _child(scale: str, seed: int, out: Path) -> tuple[float, float, dict]:
    """Run the generator in a child; returns (wall seconds, peak RSS GiB, stats)."""
    code = (
        "import sys; from pathlib import Path; from hm_recsys.data.synthetic import generate; "
        f"generate(Path({str(out)!r}), scale={scale!r}, seed={seed}, progress=False)"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:  # an earlier child was bigger; ru_maxrss is a max over all children
        peak_kib = before
    stats = json.loads((out / "oracle" / "stats.json").read_text())
    return wall, peak_kib / 2**20, stats


def _baselines(csv_path: Path, rows_per_week: int) -> dict[str, float]:
    """Seconds to write one average week of rows with pandas and with pyarrow (best of 3)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from hm_recsys.data import schema

    df = pd.read_csv(csv_path, nrows=rows_per_week, **schema.read_csv_kwargs("transactions"))
    df = df.astype({"price": "float64", "sales_channel_id": "int8"})  # typed, as a generator holds them
    table = pa.Table.from_pandas(df.astype({"price": "string"}), preserve_index=False)
    opts = pacsv.WriteOptions(quoting_style="none", quoting_header="none")
    out = {}
    for name, fn in {
        "pandas": lambda: df.to_csv(io.StringIO(), index=False),
        "pyarrow": lambda: pacsv.write_csv(table, io.BytesIO(), opts),
    }.items():
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="small", choices=["tiny", "small", "full"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument(
        "--existing",
        type=Path,
        default=None,
        help="do not generate: measure the baselines on a dataset generated before (its oracle/stats.json "
        "gives the generation time; peak RSS is then unknown, measure it with /usr/bin/time -v)",
    )
    args = p.parse_args(argv)
    if args.existing is not None:
        args.out, args.keep = args.existing, True
    out = args.out or Path(tempfile.mkdtemp(prefix="hm-bench-generate-"))
    try:
        if args.existing is not None:
            stats = json.loads((out / "oracle" / "stats.json").read_text())
            wall, peak_gib, args.scale = float(stats["seconds"]), float("nan"), stats["scale"]
        else:
            wall, peak_gib, stats = _child(args.scale, args.seed, out)
        rows = stats["rows_total"] + stats["rows_future"]
        weeks = stats["weeks"] + 1
        base = _baselines(out / "transactions_train.csv", rows // weeks)
        size_gb = sum(f.stat().st_size for f in out.rglob("*.csv")) / 1e9
        pandas_all = base["pandas"] * weeks
        arrow_all = base["pyarrow"] * weeks
        print(f"scale {args.scale}: {stats['customers']:,} customers, {stats['articles']:,} articles, {rows:,} rows, {weeks} weeks")
        how = "(stats.json)     " if args.existing else "(child process)  "
        rss = "n/a (use /usr/bin/time -v)" if args.existing else f"{peak_gib:6.2f} GiB"
        print(f"  generate {how}      {wall:9.1f} s   {rows / wall:12,.0f} rows/s   peak RSS {rss}   CSV {size_gb:.2f} GB")
        print(f"  baseline pandas.to_csv only     {pandas_all:9.1f} s   {rows / pandas_all:12,.0f} rows/s   (one week, x{weeks})")
        print(f"  baseline pyarrow write_csv only {arrow_all:9.1f} s   {rows / arrow_all:12,.0f} rows/s   (one week, x{weeks})")
        print(f"  ratio generate / pandas-write-only:  {wall / pandas_all:6.2f}x")
        print(f"  ratio generate / pyarrow-write-only: {wall / arrow_all:6.2f}x")
        if args.scale == "full":
            print(f"  target: < 900 s on 2 cores -> {'OK' if wall < 900 else 'MISSED'} ({wall / 900:.0%} of budget)")
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
