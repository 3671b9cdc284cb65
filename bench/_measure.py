"""The benchmarks' harness: run a snippet in a fresh interpreter and report its time and peak RSS.

Each step gets its own process, so steps do not inherit each other's memory;
libraries are imported before the clock starts, so the figures are the work,
not interpreter start-up. The snippet sets ``extra`` (a dict) to report more.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_PRELUDE = """
import datetime as dt, json, resource, sys, time
from pathlib import Path
import numpy, pandas, pyarrow, pyarrow.csv, pyarrow.parquet
{imports}
t0 = time.perf_counter()
_ru = resource.getrusage(resource.RUSAGE_SELF)
cpu0 = _ru.ru_utime + _ru.ru_stime
"""
_EPILOGUE = """
ru = resource.getrusage(resource.RUSAGE_SELF)
print("@@" + json.dumps({"seconds": time.perf_counter() - t0, "cpu": ru.ru_utime + ru.ru_stime - cpu0,
                         "peak_mib": ru.ru_maxrss / 1024, **extra}))
"""


def measure(label: str, body: str, env: dict, imports: str = "") -> dict:
    """Run ``body`` (which sets ``extra``: a dict) in a fresh interpreter; return its time and peak RSS.

    ``imports`` run before the clock starts. A failing step stops the benchmark
    with the end of its stderr.
    """
    code = _PRELUDE.format(imports=imports) + textwrap.dedent(body) + _EPILOGUE
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{label} failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("@@"))
    out = json.loads(line[2:])
    print(f"  done: {label} ({out['seconds']:.1f} s)", file=sys.stderr)
    return out
