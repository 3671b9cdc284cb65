"""The promotion decision: a pure function of per-customer metrics.

Champion and challenger are scored on the same holdout customers through the
code path that serves them (``hm_recsys.served``), so their per-customer
Recall@12 values are paired. The challenger is promoted only if all of these
hold, checked in this order (the first that fails is the rule that decided):

1. **floor**: it beats the BEST heuristic baseline's Recall@12 on the same
   holdout (popularity, repurchase+popularity, trending+decayed-repurchase):
   a model that loses to any heuristic is never served, champion or not;
2. **margin** (with a champion): its relative lift in mean Recall@12 is above
   ``min_lift``;
3. **confidence** (with a champion): the lower bound of a paired bootstrap
   confidence interval of the mean difference (challenger - champion) over
   customers is above zero, so a lift that could be noise does not promote.

With no champion yet, the floor alone decides. ``force`` promotes anyway but
demands a reason, which is recorded with the decision. ``Decision.rule`` names
the rule that decided (``forced``, ``floor``, ``margin``, ``confidence``,
``all-passed``, ``no-champion``).

Nothing here does I/O, reads a clock or a global RNG: same inputs, same answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class GateConfig:
    min_lift: float = 0.02  # relative: 0.02 = challenger must be >= 2% better
    n_bootstrap: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.n_bootstrap < 100:
            raise ValueError(f"n_bootstrap must be >= 100, got {self.n_bootstrap}")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    rule: str  # which rule decided: forced, floor, margin, confidence, all-passed, no-champion
    challenger_recall: float
    champion_recall: float | None
    best_baseline: str  # the heuristic with the highest Recall@12 on the holdout
    best_baseline_recall: float
    lift: float | None  # relative lift over the champion
    ci_low: float | None  # bootstrap CI of mean(challenger - champion), absolute recall
    ci_high: float | None
    forced: bool = False

    def as_tags(self) -> dict[str, str]:
        """Flat string tags for an MLflow model version."""
        return {f"gate.{k}": "" if v is None else str(v) for k, v in asdict(self).items()}


def _bootstrap_means(values: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    """``(n_bootstrap, c)`` column means of ``values`` ``(n, c)`` over rows resampled with replacement.

    Rows are customers: resampling them keeps each customer's values paired
    across columns. Chunked so 2000 x 100k customers never materialises at once.
    """
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    means = np.empty((n_bootstrap, values.shape[1]))
    step = max(1, 20_000_000 // max(n, 1))
    for s in range(0, n_bootstrap, step):
        m = min(step, n_bootstrap - s)
        idx = rng.integers(0, n, size=(m, n))
        means[s : s + m] = values[idx].mean(axis=1)
    return means


def paired_bootstrap_ci(
    a: np.ndarray, b: np.ndarray, n_bootstrap: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile CI of mean(a - b), resampling customers (pairs) with replacement."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    means = _bootstrap_means(diff[:, None], n_bootstrap, seed)[:, 0]
    alpha = 1 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_bootstrap_ratio_ci(
    a: np.ndarray, b: np.ndarray, n_bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile CI of mean(a) / mean(b), resampling customers (pairs) with replacement."""
    pairs = np.stack([np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)], axis=1)
    means = _bootstrap_means(pairs, n_bootstrap, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = means[:, 0] / means[:, 1]
    alpha = 1 - confidence
    lo, hi = np.quantile(ratio, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def decide(
    challenger: np.ndarray,
    champion: np.ndarray | None,
    baselines: Mapping[str, float],
    config: GateConfig = GateConfig(),
    force_reason: str | None = None,
) -> Decision:
    """Decide whether the challenger replaces the champion.

    ``challenger`` and ``champion`` are per-customer Recall@12 arrays aligned
    on the same customers (shape ``(n,)``); ``champion`` is ``None`` when
    there is no champion yet. ``baselines`` maps every heuristic baseline's
    name to its mean Recall@12 on the same holdout; the best is the floor.
    """
    ch = np.asarray(challenger, dtype=np.float64)
    if ch.ndim != 1 or ch.size == 0:
        raise ValueError("challenger must be a non-empty 1-D array of per-customer recall")
    if not baselines:
        raise ValueError("the gate needs the heuristic baselines' recall: the floor is the best of them")
    best = max(baselines, key=lambda b: baselines[b])
    floor = float(baselines[best])
    ch_mean = float(ch.mean())
    base = dict(challenger_recall=ch_mean, best_baseline=best, best_baseline_recall=floor)
    floor_msg = f"recall@12 {ch_mean:.4f} vs best heuristic {best} {floor:.4f}"

    if force_reason is not None:
        if not force_reason.strip():
            raise ValueError("force-promote needs a non-empty reason")
        champ_mean = None if champion is None else float(np.mean(champion))
        return Decision(True, f"forced: {force_reason.strip()}", "forced", champion_recall=champ_mean,
                        lift=None, ci_low=None, ci_high=None, forced=True, **base)

    beats_floor = ch_mean > floor
    if champion is None:
        if beats_floor:
            reason = f"promote (no champion yet): {floor_msg}"
            return Decision(True, reason, "no-champion", champion_recall=None, lift=None, ci_low=None, ci_high=None,
                            **base)
        return Decision(False, f"refused by the floor: {floor_msg}", "floor", champion_recall=None, lift=None,
                        ci_low=None, ci_high=None, **base)

    cp = np.asarray(champion, dtype=np.float64)
    if cp.shape != ch.shape:
        raise ValueError(f"champion {cp.shape} and challenger {ch.shape} must be scored on the same customers")
    cp_mean = float(cp.mean())
    lift = (ch_mean - cp_mean) / cp_mean if cp_mean > 0 else (np.inf if ch_mean > 0 else 0.0)
    lo, hi = paired_bootstrap_ci(ch, cp, config.n_bootstrap, config.confidence, config.seed)
    pct = f"{config.confidence:.0%}"
    checks = [
        ("floor", beats_floor, floor_msg),
        ("margin", lift > config.min_lift, f"lift {lift:+.2%} over champion {cp_mean:.4f} vs margin "
                                           f"{config.min_lift:+.2%}"),
        ("confidence", lo > 0, f"{pct} CI of the gain [{lo:+.4f}, {hi:+.4f}]"),
    ]
    failed = [(rule, msg) for rule, ok, msg in checks if not ok]
    if failed:
        rule = failed[0][0]
        reason = f"keep champion (rule: {rule}): " + "; ".join(msg for _, msg in failed)
        return Decision(False, reason, rule, champion_recall=cp_mean, lift=float(lift), ci_low=lo, ci_high=hi, **base)
    reason = "promote: " + "; ".join(msg for _, _, msg in checks)
    return Decision(True, reason, "all-passed", champion_recall=cp_mean, lift=float(lift), ci_low=lo, ci_high=hi,
                    **base)
