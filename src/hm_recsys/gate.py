"""The promotion decision: a pure function of per-customer metrics.

Champion and challenger are scored on the same holdout customers through the
indexes that would serve them, so their per-customer Recall@12 values are
paired. The challenger is promoted only if all of these hold:

1. it beats the last-week popularity baseline's Recall@12 (a model that loses
   to popularity is never served, champion or not);
2. with a champion: its relative lift in mean Recall@12 is above ``min_lift``;
3. with a champion: the lower bound of a paired bootstrap confidence interval
   of the mean difference (challenger - champion) over customers is above zero,
   so a lift that could be noise does not promote.

With no champion yet, condition 1 alone decides. ``force`` promotes anyway but
demands a reason, which is recorded with the decision.

Nothing here does I/O, reads a clock or a global RNG: same inputs, same answer.
"""

from __future__ import annotations

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
    challenger_recall: float
    champion_recall: float | None
    popularity_recall: float
    lift: float | None  # relative lift over the champion
    ci_low: float | None  # bootstrap CI of mean(challenger - champion), absolute recall
    ci_high: float | None
    forced: bool = False

    def as_tags(self) -> dict[str, str]:
        """Flat string tags for an MLflow model version."""
        return {f"gate.{k}": "" if v is None else str(v) for k, v in asdict(self).items()}


def paired_bootstrap_ci(
    a: np.ndarray, b: np.ndarray, n_bootstrap: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile CI of mean(a - b), resampling customers (pairs) with replacement."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = diff.size
    rng = np.random.default_rng(seed)
    # Chunked so 2000 x 100k customers never materialises at once.
    means = np.empty(n_bootstrap)
    step = max(1, 20_000_000 // max(n, 1))
    for s in range(0, n_bootstrap, step):
        m = min(step, n_bootstrap - s)
        idx = rng.integers(0, n, size=(m, n))
        means[s : s + m] = diff[idx].mean(axis=1)
    alpha = 1 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def decide(
    challenger: np.ndarray,
    champion: np.ndarray | None,
    popularity_recall: float,
    config: GateConfig = GateConfig(),
    force_reason: str | None = None,
) -> Decision:
    """Decide whether the challenger replaces the champion.

    ``challenger`` and ``champion`` are per-customer Recall@12 arrays aligned
    on the same customers (shape ``(n,)``); ``champion`` is ``None`` when
    there is no champion yet. ``popularity_recall`` is the popularity
    baseline's mean Recall@12 on the same holdout.
    """
    ch = np.asarray(challenger, dtype=np.float64)
    if ch.ndim != 1 or ch.size == 0:
        raise ValueError("challenger must be a non-empty 1-D array of per-customer recall")
    ch_mean = float(ch.mean())
    base = dict(challenger_recall=ch_mean, popularity_recall=float(popularity_recall))

    if force_reason is not None:
        if not force_reason.strip():
            raise ValueError("force-promote needs a non-empty reason")
        champ_mean = None if champion is None else float(np.mean(champion))
        return Decision(True, f"forced: {force_reason.strip()}", champion_recall=champ_mean,
                        lift=None, ci_low=None, ci_high=None, forced=True, **base)

    beats_pop = ch_mean > popularity_recall
    if champion is None:
        if beats_pop:
            reason = f"no champion yet; recall@12 {ch_mean:.4f} beats popularity {popularity_recall:.4f}"
        else:
            reason = f"recall@12 {ch_mean:.4f} does not beat popularity {popularity_recall:.4f}"
        return Decision(beats_pop, reason, champion_recall=None, lift=None, ci_low=None, ci_high=None, **base)

    cp = np.asarray(champion, dtype=np.float64)
    if cp.shape != ch.shape:
        raise ValueError(f"champion {cp.shape} and challenger {ch.shape} must be scored on the same customers")
    cp_mean = float(cp.mean())
    lift = (ch_mean - cp_mean) / cp_mean if cp_mean > 0 else (np.inf if ch_mean > 0 else 0.0)
    lo, hi = paired_bootstrap_ci(ch, cp, config.n_bootstrap, config.confidence, config.seed)
    pct = f"{config.confidence:.0%}"
    checks = [
        (beats_pop, f"recall@12 {ch_mean:.4f} vs popularity {popularity_recall:.4f}"),
        (lift > config.min_lift, f"lift {lift:+.2%} vs margin {config.min_lift:+.2%}"),
        (lo > 0, f"{pct} CI of the gain [{lo:+.4f}, {hi:+.4f}]"),
    ]
    failed = [msg for ok, msg in checks if not ok]
    if failed:
        reason = "keep champion: " + "; ".join(failed)
    else:
        reason = "promote: " + "; ".join(msg for _, msg in checks)
    return Decision(not failed, reason, champion_recall=cp_mean, lift=float(lift), ci_low=lo, ci_high=hi, **base)
