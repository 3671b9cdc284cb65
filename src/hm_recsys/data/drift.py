"""Drift of a weekly drop against the training window: ``drift_report`` and ``plot_drift``.

Validation (``hm_recsys.data.validate``) asks "is this file well-formed and
plausible?"; drift asks "does this week look like the weeks the model was
trained on?". It never rejects a drop: its verdict is a warning signal that
travels with the drop's report (``report.json``'s ``drift`` section and
``drift.png`` next to it, see ``hm_recsys.data.drops``).

The reference is the ``reference_weeks`` warehouse weeks before the drop's
week (12 by default: the training window of ``train.TrainConfig.train_weeks``).
Six metrics, each an effect size (the ``value``) with a "warn" and a "drift"
threshold:

===============  ===============================================  ========================================
metric           value (effect size)                              test (``p_value``)
===============  ===============================================  ========================================
price            KS statistic D of the price distributions        ``scipy.stats.ks_2samp``
                 (``scipy.stats.ks_2samp``); Wasserstein distance
                 (``scipy.stats.wasserstein_distance``) alongside
channel          total variation distance of the channel shares   ``scipy.stats.chi2_contingency`` (2 x k;
                 (two channels: |change of the online share|)     categories expected < 5 rows merged)
index_group      Jensen-Shannon distance, base 2 (0..1), of the    ``chi2_contingency`` (2 x k; categories
product_type     category shares (``scipy.spatial.distance``);     expected < 5 rows merged)
                 articles missing from the table are "unknown"
new_customers    share of the drop's distinct buyers who never    ``chi2_contingency`` (2 x 2: drop vs
                 bought before, minus the mean of the same share  reference weeks, new vs returning)
                 of each reference week (one-sided: only more
                 never-seen ids are a risk)
new_articles     the same for distinct articles never sold        ``chi2_contingency`` (2 x 2)
                 before
===============  ===============================================  ========================================

A metric's level (``ok`` below "warn", ``warn``, ``drift`` at or above
"drift") counts only if the change is also

1. **significant**: ``p_value < alpha``. On a few hundred rows (tiny data)
   sampling noise alone can reach a threshold; at full scale (300k rows
   against 3.5M) every p-value is ~0 and this gate is open;
2. **unusual**: above ``median + baseline_mads x MAD`` (robust standard
   deviations, ``scipy.stats.median_abs_deviation``) of the same value for
   each reference week against the other reference weeks (the
   ``baseline``). Rows are not independent draws (a hit article sells
   thousands of times), so a test over rows overstates significance; the
   reference weeks' own week-to-week variation is the honest yardstick. The
   median and MAD, not the maximum, so that one odd week in the window does
   not hide the next one. Needs ``baseline_min_weeks`` reference weeks.

Otherwise the metric is ``ok`` with a ``note`` saying which gate held it.

"Never seen before" means in no warehouse week before the week (the whole
history, not only the window). A week with fewer than
``novelty_history_weeks`` weeks before it has no meaningful novelty share
(everything is new when a history begins): such reference weeks are left
out, and a drop in that position gets ``no-reference`` for those two metrics.

Verdicts per metric: ``ok`` / ``warn`` / ``drift``, or ``no-reference`` (no
reference data for it) / ``no-data`` (the drop has no usable value, e.g. no
parseable price). Overall: the worst of ``ok < warn < drift`` over the
metrics that have one, ``no-reference`` when none has (no week before the
drop), ``error`` when the computation failed (``drift_for_drop`` records the
message instead of raising).

Cost: the warehouse is read part file by part file and only the columns
needed (the two id columns of every earlier week, through their Parquet
dictionaries; price and channel of the reference weeks); ids are looked up
by 64-bit keys (``validate.IdIndex``). Measured timings: docs/validation.md
("Drift").
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import pyarrow as pa

    from hm_recsys.data.warehouse import Warehouse

__all__ = [
    "DRIFT",
    "ERROR",
    "METRICS",
    "NO_DATA",
    "NO_REFERENCE",
    "OK",
    "WARN",
    "DriftConfig",
    "drift_for_drop",
    "drift_report",
    "error_report",
    "plot_drift",
    "read_drop",
]

METRICS = ("price", "channel", "index_group", "product_type", "new_customers", "new_articles")
OK, WARN, DRIFT = "ok", "warn", "drift"
NO_REFERENCE, NO_DATA, ERROR = "no-reference", "no-data", "error"
_RANK = {OK: 0, WARN: 1, DRIFT: 2}
_CHANNEL_NAMES = {1: "1 store", 2: "2 online"}
UNKNOWN = "unknown"  # category of an article the articles table lacks
_ENV = "HM_RECSYS_DRIFT_"


# ==========================================================================
# Configuration
# ==========================================================================
@dataclass(frozen=True)
class DriftConfig:
    """Reference window, ``(warn, drift)`` thresholds per metric and the gates (see the module doc).

    The thresholds are effect sizes, set from the week-to-week variation of
    generated data (every week of the small and full datasets against the 12
    weeks before it; docs/validation.md lists the measured ranges): "warn"
    sits well above the largest normal week, "drift" where a change is
    unmistakable.

    Environment (read by ``from_env``, at call time, never at import):
    ``HM_RECSYS_DRIFT_<FIELD>`` for the scalar fields (e.g.
    ``HM_RECSYS_DRIFT_REFERENCE_WEEKS=8``) and
    ``HM_RECSYS_DRIFT_<METRIC>=warn,drift`` (e.g. ``HM_RECSYS_DRIFT_PRICE=0.1,0.25``).
    """

    # The training window the model sees by default (train.TrainConfig.train_weeks): drift is measured
    # against what the model learnt from.
    reference_weeks: int = 12
    # Novelty shares mean something only after a few weeks of history (validation's history_weeks).
    novelty_history_weeks: int = 4
    # Six tests a week: at 1e-3 a false alarm from sampling noise is ~1 week in 170.
    alpha: float = 1e-3
    # "Unusual" = above median + 3.5 robust SDs (MAD x 1.4826) of the reference weeks' own values: the
    # modified z-score outlier rule of Iglewicz and Hoaglin.
    baseline_mads: float = 3.5
    # A median and a MAD from fewer weeks are too unstable to judge by; with fewer the gate is skipped.
    baseline_min_weeks: int = 4
    # Reference prices per week compared in the baseline (a KS D from 50k rows is within ~0.01 of the full one,
    # and 12 comparisons of 3.5M rows would cost seconds).
    baseline_sample: int = 50_000
    # KS D = the largest gap between the two price CDFs (0..1). Normal weeks: <= 0.07 (small), <= 0.03 (full),
    # markdowns included. Every price 5-10% up gives ~0.2 (each price point moves); a unit error (x3, /590)
    # 0.6-1.
    price: tuple[float, float] = (0.10, 0.25)
    # Total variation distance of the channel shares (0..1) = the online share's change in points / 100.
    # Normal weeks: <= 0.023 (small), <= 0.006 (full). 5 points is ~20% of the store sales missing (or a strong
    # online campaign), 10 points ~40%: the popularity counts the model ranks by move with it.
    channel: tuple[float, float] = (0.05, 0.10)
    # Five index groups. Normal weeks: JS <= 0.032 (small), <= 0.010 (full). 0.1 is the largest group (37%)
    # gaining or losing a third of its share, or a 9% group doubling; 0.2 is that 9% group missing entirely;
    # one group left gives ~0.65.
    index_group: tuple[float, float] = (0.10, 0.20)
    # ~130 product types (38 generated): many rare categories make JS noisier (normal weeks 0.03-0.12 at both
    # scales), hence higher bars than for index groups.
    product_type: tuple[float, float] = (0.15, 0.30)
    # Share of the week's buyers never seen before, above the reference weeks' mean: normal weeks <= 0.002
    # (the share falls as the history grows). ~8% of real buyers are new each week; 10 more points is a campaign or
    # a partial re-keying, 25 points means customer ids no longer match the history.
    new_customers: tuple[float, float] = (0.10, 0.25)
    # Share of the distinct articles sold that never sold before, above the reference mean: normal weeks
    # <= 0.01 (launches are ~1-3% of the articles sold). 5 points is an unusual launch wave, 15 points a
    # catalogue re-keying (the model has no sales history for any of them).
    new_articles: tuple[float, float] = (0.05, 0.15)
    top_categories: int = 8  # categories listed in the report and the plot (the rest as "other")
    price_bins: int = 40  # log-spaced price histogram bins in the report and the plot

    def __post_init__(self) -> None:
        for name in ("reference_weeks", "novelty_history_weeks", "baseline_min_weeks", "baseline_sample",
                     "top_categories"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.baseline_mads < 0 or self.price_bins < 2:
            raise ValueError("baseline_mads must be >= 0 and price_bins >= 2")
        for m in METRICS:
            warn, drift = self.thresholds(m)
            if not 0 <= warn <= drift:
                raise ValueError(f"{m} thresholds must be (warn, drift) with 0 <= warn <= drift, got {(warn, drift)}")

    def thresholds(self, metric: str) -> tuple[float, float]:
        warn, drift = getattr(self, metric)
        return float(warn), float(drift)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DriftConfig:
        """Defaults overridden by ``HM_RECSYS_DRIFT_*`` variables (see the class doc). Raises ``ValueError``."""
        env = os.environ if env is None else env
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            v = env.get(_ENV + f.name.upper())
            if not v:
                continue
            if f.name in METRICS:
                parts = [float(x) for x in v.replace(" ", "").split(",")]
                if len(parts) != 2:
                    raise ValueError(f"{_ENV}{f.name.upper()} must be 'warn,drift', got {v!r}")
                kw[f.name] = (parts[0], parts[1])
            else:
                kw[f.name] = float(v) if f.name in ("alpha", "baseline_mads") else int(v)
        return cls(**kw)


# ==========================================================================
# Reading
# ==========================================================================
_DROP_COLUMNS = ("t_dat", "customer_id", "article_id", "price", "sales_channel_id")


def read_drop(path: Path) -> pd.DataFrame:
    """A drop CSV's rows as text (columns t_dat, customer_id, article_id, price, sales_channel_id).

    Tolerant on purpose (rejected drops get a drift section too): lines with
    too many fields are skipped, undecodable bytes replaced; ``drift_report``
    converts the values. Raises (``ValueError``, pandas' parser errors) when
    the file has no such columns at all: for the caller to record.
    """
    import pandas as pd

    return pd.read_csv(path, usecols=list(_DROP_COLUMNS), dtype=str, keep_default_na=False, na_filter=False,
                       on_bad_lines="skip", encoding_errors="replace", engine="c")


def _strings(values: pd.Series) -> pa.Array:
    """Distinct non-null values of a Series (text or categorical) as an Arrow string array."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values.dtype, pd.CategoricalDtype):
        codes = values.cat.codes.to_numpy()
        cats = values.cat.categories[np.unique(codes[codes >= 0])]
        return pa.array(np.asarray(cats, dtype=object), pa.string())
    return pc.unique(pa.array(values.dropna().astype(str).to_numpy(dtype=object), pa.string()))


def _value_counts(col) -> tuple[pa.Array, np.ndarray]:
    """``(distinct values, rows of each)`` of an Arrow id column, from its dictionary without decoding rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    # The chunks of one part share one dictionary: combining them is cheap (no re-hashing of 64-char ids).
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        counts = np.bincount(arr.indices.drop_null().to_numpy(zero_copy_only=False), minlength=len(arr.dictionary))
        used = counts > 0  # a dictionary may hold values no row uses (sliced row groups)
        return arr.dictionary.filter(pa.array(used)).cast(pa.string()), counts[used]
    vc = pc.value_counts(arr.drop_null())
    return vc.field("values").cast(pa.string()), vc.field("counts").to_numpy(zero_copy_only=False)


def _catalogue(path: Path, column: str) -> pa.Array:
    """The catalogue's ids (empty without the file). Ids outside it get no position: they count as never seen
    (a drop's unknown ids are new by definition) and as category "unknown"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        return pa.array([], pa.string())
    return pq.read_table(path, columns=[column]).column(0).combine_chunks().cast(pa.string())


def _new_count(index, seen: np.ndarray, ids: pa.Array, verify: bool) -> tuple[int, int, np.ndarray]:
    """``(distinct, never seen, catalogue positions (-1: not in it))`` of distinct ``ids``; unknown ids are new."""
    pos = index.positions(ids, verify=verify)
    return len(ids), int((~seen[pos[pos >= 0]]).sum() + (pos < 0).sum()), pos


@dataclass
class _Week:
    """What the metrics need from one reference week."""

    label: str
    history_weeks: int  # warehouse weeks before it
    prices: np.ndarray  # positive finite prices, one per row
    channels: dict[str, int]  # rows per channel label
    article_rows: np.ndarray  # rows per article catalogue position (last slot: not in the catalogue)
    customers: int  # distinct
    new_customers: int  # distinct, never seen before its week
    articles: int
    new_articles: int


@dataclass
class _Reference:
    weeks: list[_Week]
    history_weeks: int  # warehouse weeks before the drop's week
    seen_customers: np.ndarray  # per customer catalogue position: bought before the drop's week
    seen_articles: np.ndarray


def _channel_label(v: float) -> str:
    if np.isnan(v):
        return "invalid"
    return _CHANNEL_NAMES.get(int(v), f"{v:g}") if float(v).is_integer() else f"{v:g}"


def _read_reference(wh: Warehouse, week: dt.date, cust_index, art_index, config: DriftConfig) -> _Reference:
    """One pass over the warehouse weeks before ``week``, oldest first, reading only the columns needed."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    before = [w for w in wh.weeks() if w < week]
    in_window = set(before[-config.reference_weeks :])
    seen_c = np.zeros(len(cust_index), dtype=bool)
    seen_a = np.zeros(len(art_index), dtype=bool)
    weeks: list[_Week] = []
    for i, w in enumerate(before):
        in_ref = w in in_window
        cols = ["customer_id", "article_id", "price", "sales_channel_id"] if in_ref else ["customer_id", "article_id"]
        tables = [pq.read_table(f, columns=cols) for f in wh.part_files(w)]
        if not tables:
            continue
        t = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
        customers, _ = _value_counts(t.column("customer_id"))
        articles, rows = _value_counts(t.column("article_id"))
        n_c, new_c, pos_c = _new_count(cust_index, seen_c, customers, False)
        n_a, new_a, pos_a = _new_count(art_index, seen_a, articles, False)
        if in_ref:
            p = t.column("price").to_numpy()
            vc = pc.value_counts(t.column("sales_channel_id").combine_chunks())
            channels = {_channel_label(float(v)): int(n) for v, n in
                        zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)
                        if v is not None}
            art_rows = np.bincount(np.where(pos_a < 0, len(art_index), pos_a), weights=rows,
                                   minlength=len(art_index) + 1).astype(np.int64)
            weeks.append(_Week(w.isoformat(), i, p[np.isfinite(p) & (p > 0)], channels, art_rows, n_c, new_c,
                               n_a, new_a))
        seen_c[pos_c[pos_c >= 0]] = True
        seen_a[pos_a[pos_a >= 0]] = True
    return _Reference(weeks, len(before), seen_c, seen_a)


# ==========================================================================
# Statistics
# ==========================================================================
def _baseline(values: Sequence[float], config: DriftConfig) -> dict | None:
    """The reference weeks' own values (each week against the others): median, MAD and the "unusual" limit."""
    from scipy.stats import median_abs_deviation

    v = np.asarray(values, dtype=np.float64)
    if len(v) < config.baseline_min_weeks:
        return None
    med = float(np.median(v))
    mad = float(median_abs_deviation(v, scale="normal"))  # a robust standard deviation
    return {"values": [round(float(x), 6) for x in v], "median": med, "mad": mad,
            "limit": med + config.baseline_mads * mad}


def _leave_one_out(parts: Sequence, value: Callable[[Any, list], float | None], config: DriftConfig) -> dict | None:
    """``_baseline`` of ``value(part, other parts)`` for each reference-week part."""
    if len(parts) < config.baseline_min_weeks:
        return None
    vals = [value(p, [q for j, q in enumerate(parts) if j != i]) for i, p in enumerate(parts)]
    return _baseline([v for v in vals if v is not None], config)


def _judge(m: dict, config: DriftConfig, name: str) -> dict:
    """Set ``verdict`` on a metric with a ``value``: the threshold level, if significant and unusual (module doc)."""
    warn, drift = config.thresholds(name)
    v = m["value"]
    level = DRIFT if v >= drift else WARN if v >= warn else OK
    p, base = m.get("p_value"), m.get("baseline")
    if level != OK and p is not None and not p < config.alpha:
        m["note"] = (f"{m['statistic']} {v:.3g} reaches the {level} threshold but is not significant "
                     f"(p = {p:.2g} >= alpha {config.alpha:g}): too few rows to tell it from noise")
        level = OK
    elif level != OK and base is not None and not v > base["limit"]:
        m["note"] = (f"{m['statistic']} {v:.3g} reaches the {level} threshold but is within the reference weeks' "
                     f"own variation (limit {base['limit']:.3g} = median {base['median']:.3g} + "
                     f"{config.baseline_mads:g} x MAD {base['mad']:.3g})")
        level = OK
    elif level != OK and base is None:
        m["note"] = f"fewer than {config.baseline_min_weeks} reference weeks: the 'unusual' gate was not applied"
    m["verdict"] = level
    return m


def _chi2_p(table: np.ndarray) -> float:
    """p-value of the chi-square homogeneity test of a 2 x k table; 1.0 when the rows cannot differ."""
    from scipy.stats import chi2_contingency

    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 1.0
    return float(chi2_contingency(table, correction=False).pvalue)


def _pool_sparse(table: np.ndarray) -> np.ndarray:
    """Merge the rarest category into the next rarest while its expected count is below 5 in a row (Cochran's
    rule for the chi-square approximation): one stray value must not make a whole table "significant"."""
    table = table[:, table.sum(axis=0) > 0]
    rows, n = table.sum(axis=1), table.sum()
    while table.shape[1] > 2 and n:
        order = np.argsort(table.sum(axis=0), kind="stable")
        if (rows * table[:, order[0]].sum() / n >= 5).all():
            break
        merged = table[:, order[0]] + table[:, order[1]]
        table = np.column_stack([table[:, order[2:]], merged])
    return table


def _base(name: str, statistic: str, test: str, config: DriftConfig) -> dict:
    warn, drift = config.thresholds(name)
    return {"statistic": statistic, "test": test, "value": None, "p_value": None, "reference": None, "drop": None,
            "thresholds": {"warn": warn, "drift": drift}, "baseline": None, "verdict": None, "note": None}


def _price_stats(x: np.ndarray) -> dict | None:
    if not len(x):
        return None
    q = np.quantile(x, [0.1, 0.5, 0.9])
    return {"rows": int(len(x)), "mean": float(x.mean()), "p10": float(q[0]), "median": float(q[1]),
            "p90": float(q[2])}


def _price_metric(drop: np.ndarray, weeks: list[_Week], config: DriftConfig) -> dict:
    from scipy.stats import ks_2samp, wasserstein_distance

    m = _base("price", "KS D", "scipy.stats.ks_2samp", config)
    ref = np.concatenate([w.prices for w in weeks]) if weeks else np.empty(0)
    m["reference"], m["drop"] = _price_stats(ref), _price_stats(drop)
    both = np.concatenate([ref, drop])
    if len(both):
        lo, hi = float(both.min()), float(both.max())
        edges = np.geomspace(lo, hi if hi > lo else lo * 1.01, config.price_bins + 1)
        m["histogram"] = {  # shares of rows per log-spaced price bin (for the plot), 6 digits are plenty
            "edges": [float(f"{e:.6g}") for e in edges],
            "reference": np.round(np.histogram(ref, edges)[0] / max(len(ref), 1), 6).tolist(),
            "drop": np.round(np.histogram(drop, edges)[0] / max(len(drop), 1), 6).tolist(),
        }
    if not len(drop):
        m["verdict"], m["note"] = NO_DATA, "the drop has no parseable positive price"
        return m
    if not len(ref):
        m["verdict"] = NO_REFERENCE
        return m
    ks = ks_2samp(drop, ref)
    m["value"], m["p_value"] = float(ks.statistic), float(ks.pvalue)
    # Prices are a few thousand price points: the distance over (value, count) pairs is the same number as
    # over the rows, for a fraction of the sorting.
    (dv, dc), (rv, rc) = np.unique(drop, return_counts=True), np.unique(ref, return_counts=True)
    w = float(wasserstein_distance(dv, rv, dc, rc))
    m["wasserstein"], m["wasserstein_relative"] = w, w / float(ref.mean())  # relative: in reference mean prices
    rng = np.random.default_rng(0)  # a fixed sample: the same drop gets the same report
    sample = [w.prices if len(w.prices) <= config.baseline_sample else
              rng.choice(w.prices, config.baseline_sample, replace=False) for w in weeks]
    sample = [s for s in sample if len(s)]
    m["baseline"] = _leave_one_out(sample, lambda s, rest: float(ks_2samp(s, np.concatenate(rest)).statistic),
                                   config)
    return _judge(m, config, "price")


def _shares(counts: Mapping[str, int], labels: Sequence[str]) -> dict[str, float]:
    n = sum(counts.values())
    return {k: (counts.get(k, 0) / n if n else 0.0) for k in labels}


def _sum(dicts: Sequence[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _table(a: Mapping[str, int], b: Mapping[str, int]) -> tuple[list[str], np.ndarray]:
    labels = sorted(set(a) | set(b))
    return labels, np.array([[a.get(k, 0) for k in labels], [b.get(k, 0) for k in labels]], dtype=np.float64)


def _tvd(a: Mapping[str, int], b: Mapping[str, int]) -> float | None:
    """Total variation distance of two count dicts' shares (0..1); ``None`` if one is empty."""
    _, t = _table(a, b)
    s = t.sum(axis=1)
    if not s.all():
        return None
    return float(0.5 * np.abs(t[0] / s[0] - t[1] / s[1]).sum())


def _js(a: Mapping[str, int], b: Mapping[str, int]) -> float | None:
    """Jensen-Shannon distance (base 2, 0..1) of two count dicts' shares; ``None`` if one is empty."""
    from scipy.spatial.distance import jensenshannon

    _, t = _table(a, b)
    s = t.sum(axis=1)
    if not s.all():
        return None
    return float(jensenshannon(t[0] / s[0], t[1] / s[1], base=2))


def _channel_metric(drop: dict[str, int], weeks: list[dict[str, int]], config: DriftConfig) -> dict:
    from scipy.stats.contingency import association

    m = _base("channel", "TVD", "scipy.stats.chi2_contingency", config)
    ref = _sum(weeks)
    labels, table = _table(ref, drop)
    m["reference"] = {"rows": int(table[0].sum()), "shares": _shares(ref, labels)}
    m["drop"] = {"rows": int(table[1].sum()), "shares": _shares(drop, labels)}
    if not table[1].sum():
        m["verdict"], m["note"] = NO_DATA, "the drop has no rows"
        return m
    if not table[0].sum():
        m["verdict"] = NO_REFERENCE
        return m
    m["value"], m["p_value"] = _tvd(ref, drop), _chi2_p(_pool_sparse(table))
    kept = table[:, table.sum(axis=0) > 0]
    m["cramers_v"] = float(association(kept.astype(np.int64), method="cramer")) if kept.shape[1] >= 2 else 0.0
    m["baseline"] = _leave_one_out(weeks, lambda w, rest: _tvd(_sum(rest), w), config)
    return _judge(m, config, "channel")


def _category_metric(name: str, drop: dict[str, int], weeks: list[dict[str, int]], config: DriftConfig) -> dict:
    m = _base(name, "JS distance", "scipy.spatial.distance.jensenshannon; scipy.stats.chi2_contingency", config)
    ref = _sum(weeks)
    labels, table = _table(ref, drop)
    rs, ds = table.sum(axis=1)
    rp = table[0] / rs if rs else np.zeros(len(labels))
    dp = table[1] / ds if ds else np.zeros(len(labels))
    top = np.argsort(-np.maximum(rp, dp), kind="stable")[: config.top_categories]
    m["shares"] = [{"name": labels[i], "reference": float(rp[i]), "drop": float(dp[i])} for i in top]
    if len(labels) > len(top):
        m["shares"].append({"name": "other", "reference": float(max(0.0, 1 - rp[top].sum())) if rs else 0.0,
                            "drop": float(max(0.0, 1 - dp[top].sum())) if ds else 0.0})
    m["reference"] = {"rows": int(rs), "categories": int((table[0] > 0).sum()),
                      "unknown_share": ref.get(UNKNOWN, 0) / rs if rs else 0.0}
    m["drop"] = {"rows": int(ds), "categories": int((table[1] > 0).sum()),
                 "unknown_share": drop.get(UNKNOWN, 0) / ds if ds else 0.0}
    if not ds:
        m["verdict"], m["note"] = NO_DATA, "the drop has no rows"
        return m
    if not rs:
        m["verdict"] = NO_REFERENCE
        return m
    m["value"], m["p_value"] = _js(ref, drop), _chi2_p(_pool_sparse(table))
    m["baseline"] = _leave_one_out(weeks, lambda w, rest: _js(_sum(rest), w), config)
    return _judge(m, config, name)


def _novelty_metric(name: str, distinct: int, new: int, weeks: list[_Week], eligible: bool,
                    config: DriftConfig) -> dict:
    what = name.removeprefix("new_")  # customers | articles
    m = _base(name, "share - reference mean", "scipy.stats.chi2_contingency (2 x 2)", config)
    share = new / distinct if distinct else None
    m["drop"] = {what: distinct, "new": new, "share": share}
    used = [w for w in weeks if w.history_weeks >= config.novelty_history_weeks and getattr(w, what)]
    m["weeks"] = [{"week": w.label, what: getattr(w, what), "new": getattr(w, name),
                   "share": getattr(w, name) / getattr(w, what)} for w in used]
    shares = [w["share"] for w in m["weeks"]]
    if used:
        n_r, new_r = sum(getattr(w, what) for w in used), sum(getattr(w, name) for w in used)
        m["reference"] = {"weeks": len(used), "mean": float(np.mean(shares)), "min": float(np.min(shares)),
                          "max": float(np.max(shares)), what: n_r, "new": new_r}
    if share is None:
        m["verdict"], m["note"] = NO_DATA, "the drop has no rows"
        return m
    if not eligible or not used:
        m["verdict"] = NO_REFERENCE
        m["note"] = (f"a novelty share needs {config.novelty_history_weeks} warehouse weeks before its week "
                     "(every id is new when a history begins)")
        return m
    ref = m["reference"]
    m["delta"] = share - ref["mean"]
    # One-sided: more never-seen ids than usual are cold starts the model was not trained for (a re-keyed id
    # column shows up as ~100%); fewer is no risk, and it is what a growing history does week after week.
    m["value"] = max(0.0, m["delta"])
    m["p_value"] = _chi2_p(np.array([[new_r, n_r - new_r], [new, distinct - new]], dtype=np.float64))
    m["baseline"] = _leave_one_out(shares, lambda s, rest: max(0.0, s - float(np.mean(rest))), config)
    return _judge(m, config, name)


def _channel_counts(raw: pd.Series) -> dict[str, int]:
    """Rows per channel label ("1 store", "2 online", other values as written, "invalid")."""
    import pandas as pd

    num = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    out: dict[str, int] = {}
    vals, counts = np.unique(np.where(np.isnan(num), -np.inf, num), return_counts=True)
    for v, n in zip(vals.tolist(), counts.tolist(), strict=True):
        key = _channel_label(np.nan if v == -np.inf else v)
        out[key] = out.get(key, 0) + int(n)
    return out


def _category_rows(article_rows: np.ndarray, codes: np.ndarray, names: list[str]) -> dict[str, int]:
    """Rows per category name from rows per article position (``codes``: category per position, -1 unknown;
    ``article_rows`` has one more slot, for ids outside the catalogue)."""
    codes = np.append(codes, -1)
    n = np.bincount(np.where(codes < 0, len(names), codes), weights=article_rows, minlength=len(names) + 1)
    out = {names[i]: int(n[i]) for i in range(len(names)) if n[i]}
    if n[len(names)]:
        out[UNKNOWN] = out.get(UNKNOWN, 0) + int(n[len(names)])
    return out


def _article_categories(articles: pd.DataFrame | None, wh: Warehouse, art_index) -> dict[str, tuple[np.ndarray, list]]:
    """Per category column, ``(code per article catalogue position (-1 = unknown), names)``."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = ["index_group_name", "product_type_name"]
    if articles is None:
        if wh.paths.articles.is_file():
            articles = pq.read_table(wh.paths.articles, columns=["article_id", *cols]).to_pandas()
        else:
            articles = pd.DataFrame({c: pd.Series([], dtype=str) for c in ["article_id", *cols]})
    pos = art_index.positions(pa.array(articles["article_id"].astype(str).to_numpy(dtype=object), pa.string()))
    ok = pos >= 0
    out = {}
    for c in cols:
        cat = pd.Categorical(articles[c].astype(str))
        codes = np.full(len(art_index), -1, dtype=np.int64)
        codes[pos[ok]] = cat.codes[ok]
        out[c] = (codes, [str(x) for x in cat.categories])
    return out


# ==========================================================================
# The report
# ==========================================================================
def _overall(metrics: dict[str, dict]) -> str:
    judged = [m["verdict"] for m in metrics.values() if m["verdict"] in _RANK]
    if judged:
        return max(judged, key=_RANK.__getitem__)
    if any(m["verdict"] == NO_REFERENCE for m in metrics.values()):
        return NO_REFERENCE
    return NO_DATA


def _short(name: str, m: dict) -> str:
    label = name.replace("_", " ")
    v = m["value"]
    if v is None:
        return f"{label} {m['verdict']}"
    if name == "price":
        s = f"KS {v:.2f}"
    elif name == "channel":
        s = f"TVD {100 * v:.1f} pp"
    elif name in ("index_group", "product_type"):
        s = f"JS {v:.2f}"
    else:
        s = f"{100 * m['drop']['share']:.1f}% vs {100 * m['reference']['mean']:.1f}%"
    return f"{label} {m['verdict']} ({s})"


def drift_report(
    drop_tx: pd.DataFrame,
    week: dt.date,
    warehouse: Warehouse,
    articles: pd.DataFrame | None = None,
    config: DriftConfig | None = None,
) -> dict:
    """How the drop ``drop_tx`` (its H&M week labelled ``week``) differs from the warehouse weeks before it.

    ``drop_tx``: one row per sale with ``customer_id``, ``article_id``,
    ``price`` (local price / 590) and ``sales_channel_id``, typed (as the
    warehouse returns them) or as the CSV's text; an unparseable price is
    left out of the price metric, an unparseable channel is the channel
    "invalid". ``articles``: ``article_id``, ``index_group_name``,
    ``product_type_name`` (default: those columns of the warehouse's articles
    table). ``config``: default ``DriftConfig.from_env()``. Reads only weeks
    before ``week``; a warehouse mid-commit raises ``WarehouseInterrupted``.

    Returns a JSON-able dict: ``{"week", "verdict", "summary", "reference":
    {"weeks_requested", "weeks", "rows", "history_weeks", "note"}, "drop":
    {"rows", "customers", "articles"}, "metrics": {metric: {"statistic",
    "test", "value", "p_value", "reference", "drop", "thresholds": {"warn",
    "drift"}, "baseline": {"values", "median", "mad", "limit"} | None,
    "verdict", "note", ...}}, "config", "seconds", "timings"}``. Shares are
    fractions (0..1), prices in the file's unit.
    """
    import pandas as pd
    import pyarrow as pa

    from hm_recsys.data.validate import IdIndex

    t0 = time.perf_counter()
    config = config if config is not None else DriftConfig.from_env()
    cust_index = IdIndex(_catalogue(warehouse.paths.customers, "customer_id"), "hex64")
    art_index = IdIndex(_catalogue(warehouse.paths.articles, "article_id"), "article")
    ref = _read_reference(warehouse, week, cust_index, art_index, config)
    weeks = ref.weeks
    t_ref = time.perf_counter() - t0

    t1 = time.perf_counter()
    price = pd.to_numeric(pd.Series(np.asarray(drop_tx["price"])), errors="coerce").to_numpy(dtype=np.float64)
    metrics: dict[str, dict] = {"price": _price_metric(price[np.isfinite(price) & (price > 0)], weeks, config)}
    metrics["channel"] = _channel_metric(_channel_counts(pd.Series(np.asarray(drop_tx["sales_channel_id"]))),
                                         [w.channels for w in weeks], config)
    pos = art_index.positions(pa.array(drop_tx["article_id"].astype(str).to_numpy(dtype=object), pa.string()))
    drop_rows = np.bincount(np.where(pos < 0, len(art_index), pos), minlength=len(art_index) + 1)
    cats = _article_categories(articles, warehouse, art_index)
    for col, name in (("index_group_name", "index_group"), ("product_type_name", "product_type")):
        codes, names = cats[col]
        metrics[name] = _category_metric(name, _category_rows(drop_rows, codes, names),
                                         [_category_rows(w.article_rows, codes, names) for w in weeks], config)
    eligible = ref.history_weeks >= config.novelty_history_weeks
    n_c, new_c, _ = _new_count(cust_index, ref.seen_customers, _strings(drop_tx["customer_id"]), True)
    n_a, new_a, _ = _new_count(art_index, ref.seen_articles, _strings(drop_tx["article_id"]), True)
    metrics["new_customers"] = _novelty_metric("new_customers", n_c, new_c, weeks, eligible, config)
    metrics["new_articles"] = _novelty_metric("new_articles", n_a, new_a, weeks, eligible, config)
    t_stats = time.perf_counter() - t1

    verdict = _overall(metrics)
    labels = [w.label for w in weeks]
    note = None
    if not labels:
        note = f"the warehouse has no week before {week}: nothing to compare with"
    elif len(labels) < config.reference_weeks:
        note = (f"the warehouse has only {len(labels)} week(s) before {week}; the reference uses them instead of "
                f"the {config.reference_weeks} requested")
    span = f"{len(labels)} reference week(s) {labels[0]}..{labels[-1]}" if labels else "no reference week"
    summary = f"drift {verdict.upper()} vs {span}: " + ", ".join(_short(n, metrics[n]) for n in METRICS) + "."
    return {
        "week": week.isoformat(),
        "verdict": verdict,
        "summary": summary,
        "reference": {
            "weeks_requested": config.reference_weeks,
            "weeks": labels,
            "rows": int(sum(sum(w.channels.values()) for w in weeks)),
            "history_weeks": ref.history_weeks,
            "note": note,
        },
        "drop": {"rows": int(len(drop_tx)), "customers": n_c, "articles": n_a},
        "metrics": metrics,
        "config": config.to_dict(),
        "seconds": round(time.perf_counter() - t0, 3),
        "timings": {"reference": round(t_ref, 3), "statistics": round(t_stats, 3)},
    }


def _week_of(drop_tx: pd.DataFrame) -> dt.date:
    """The H&M week most of the drop's parseable dates fall in (for a drop that declares none)."""
    import pandas as pd

    from hm_recsys.data.schema import week_start

    d = pd.to_datetime(drop_tx["t_dat"], format="%Y-%m-%d", errors="coerce").dropna()
    if d.empty:
        raise ValueError("the drop declares no week and none of its dates parses")
    return week_start(d.dt.date.mode().iloc[0])


def error_report(week: dt.date | None, message: str) -> dict:
    """The drift section of a drop whose drift could not be computed (verdict ``error``)."""
    return {"week": week.isoformat() if week else None, "verdict": ERROR, "error": message,
            "summary": f"drift ERROR: not computed ({message}).", "reference": None, "drop": None, "metrics": {}}


def drift_for_drop(path: Path, week: dt.date | None, warehouse_dir: Path, config: DriftConfig | None = None) -> dict:
    """``drift_report`` of a drop CSV (``week``: its declared week, or ``None`` for the week of most of its
    dates). Never raises for a bad file or a failed computation: the result is then ``error_report``."""
    from hm_recsys.data.warehouse import Warehouse

    try:
        config = config if config is not None else DriftConfig.from_env()
        df = read_drop(path)
        if week is None:
            week = _week_of(df)
        return drift_report(df, week, Warehouse(warehouse_dir), config=config)
    except Exception as exc:  # noqa: BLE001 (a drift failure must never lose the drop: it is recorded instead)
        return error_report(week, f"{type(exc).__name__}: {exc}")


# ==========================================================================
# The plot
# ==========================================================================
_COLOURS = {OK: "#2e7d32", WARN: "#ef6c00", DRIFT: "#c62828", NO_REFERENCE: "#616161", NO_DATA: "#616161",
            ERROR: "#c62828"}
_REF, _DROP = "#90a4ae", "#1565c0"


def _title(ax, text: str, m: dict | None) -> None:
    verdict = m["verdict"] if m else NO_DATA
    ax.set_title(f"{text}: {verdict.upper()}", color=_COLOURS.get(verdict, "black"), fontsize=10, fontweight="bold")


def _bars(ax, shares: list[dict], horizontal: bool = True) -> None:
    names = [s["name"] for s in shares]
    y = np.arange(len(names))
    h = 0.4
    ax.barh(y - h / 2, [s["reference"] for s in shares], h, color=_REF, label="reference")
    ax.barh(y + h / 2, [s["drop"] for s in shares], h, color=_DROP, label="drop")
    ax.set_yticks(y, [n if len(n) <= 22 else n[:21] + "…" for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of rows", fontsize=8)
    ax.legend(fontsize=7, loc="best")


def plot_drift(report: dict, path: Path | str) -> Path:
    """One PNG of a drift report (everything it draws is in ``report``): price distributions, channel
    shares, top index groups and product types (reference vs drop), new-customer and new-article shares
    (each reference week vs the drop); verdicts in the panel titles. Returns ``path``.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = report.get("metrics") or {}
    if report.get("verdict") == ERROR or not metrics:
        fig = Figure(figsize=(8, 2.5), dpi=100)
        FigureCanvasAgg(fig)
        fig.text(0.02, 0.6, f"Drift of week {report.get('week')}: {str(report.get('verdict')).upper()}",
                 fontsize=12, fontweight="bold", color=_COLOURS.get(report.get("verdict"), "black"))
        fig.text(0.02, 0.3, str(report.get("error") or report.get("summary"))[:160], fontsize=8, wrap=True)
        fig.savefig(path, format="png")
        return path

    fig = Figure(figsize=(15, 8.5), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    ref = report.get("reference") or {}
    weeks = ref.get("weeks") or []
    span = f"{weeks[0]}..{weeks[-1]} ({len(weeks)} weeks)" if weeks else "none"
    fig.suptitle(f"Drift of week {report['week']} vs reference {span}: {report['verdict'].upper()}",
                 fontsize=13, fontweight="bold", color=_COLOURS.get(report["verdict"], "black"))

    ax, m = axes[0, 0], metrics.get("price")
    hist = (m or {}).get("histogram")
    if hist:
        edges = np.asarray(hist["edges"])
        ax.stairs(hist["reference"], edges, fill=True, color=_REF, alpha=0.7, label="reference")
        ax.stairs(hist["drop"], edges, color=_DROP, linewidth=1.5, label="drop")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("price (log scale)", fontsize=8)
    ax.set_ylabel("share of rows", fontsize=8)
    v = (m or {}).get("value")
    _title(ax, "price" + (f" (KS {v:.2f})" if v is not None else ""), m)

    ax, m = axes[0, 1], metrics.get("channel")
    if m:
        labels = list(m["drop"]["shares"])
        x = np.arange(len(labels))
        ax.bar(x - 0.2, [m["reference"]["shares"][k] for k in labels], 0.4, color=_REF, label="reference")
        ax.bar(x + 0.2, [m["drop"]["shares"][k] for k in labels], 0.4, color=_DROP, label="drop")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of rows", fontsize=8)
        ax.legend(fontsize=7)
    v = (m or {}).get("value")
    _title(ax, "sales channel" + (f" (TVD {100 * v:.1f} pp)" if v is not None else ""), m)

    for ax, name, label in ((axes[0, 2], "index_group", "index group"), (axes[1, 0], "product_type", "product type")):
        m = metrics.get(name)
        if m:
            _bars(ax, m["shares"])
        v = (m or {}).get("value")
        _title(ax, label + (f" (JS {v:.2f})" if v is not None else ""), m)

    for ax, name, label in ((axes[1, 1], "new_customers", "new customers"), (axes[1, 2], "new_articles",
                                                                             "new articles")):
        m = metrics.get(name)
        if m:
            ws = m.get("weeks") or []
            xs = [w["week"][5:] for w in ws] + ["drop"]
            ys = [w["share"] for w in ws] + [m["drop"]["share"] or 0.0]
            ax.bar(np.arange(len(xs)), ys, color=[_REF] * len(ws) + [_DROP])
            if m.get("reference"):
                ax.axhline(m["reference"]["mean"], color="black", linewidth=0.8, linestyle="--",
                           label="reference mean")
                for level in (WARN, DRIFT):
                    ax.axhline(m["reference"]["mean"] + m["thresholds"][level], color=_COLOURS[level], linewidth=0.8,
                               linestyle=":", label=f"{level} threshold")
                ax.legend(fontsize=7)
            ax.set_xticks(np.arange(len(xs)), xs, fontsize=6, rotation=60)
            ax.set_ylabel(f"share of distinct {name.split('_')[1]} never seen before", fontsize=8)
        v = (m or {}).get("delta")
        _title(ax, label + (f" ({100 * v:+.1f} pp)" if v is not None else ""), m)

    # Fixed margins: tight_layout would measure every label first, doubling the cost of a plot.
    fig.subplots_adjust(left=0.08, right=0.985, top=0.9, bottom=0.1, wspace=0.38, hspace=0.42)
    fig.savefig(path, format="png")
    return path
