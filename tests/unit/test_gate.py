"""The promotion decision on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from hm_recsys.gate import GateConfig, decide, paired_bootstrap_ci


def _recalls(mean: float, n: int = 4000, seed: int = 0) -> np.ndarray:
    """Per-customer recall values in {0, .5, 1} with the given mean (roughly)."""
    rng = np.random.default_rng(seed)
    return rng.choice([0.0, 0.5, 1.0], size=n, p=[1 - mean, 0.0, mean])


BASE = {"popularity": 0.05, "repurchase+popularity": 0.03, "trending+decayed-repurchase": 0.04}


def test_no_champion_beats_the_best_heuristic_promotes():
    d = decide(_recalls(0.10), None, BASE)
    assert d.promote and d.rule == "no-champion" and "no champion yet" in d.reason and d.lift is None
    assert d.best_baseline == "popularity" and d.best_baseline_recall == 0.05


def test_no_champion_but_loses_to_popularity_refused():
    d = decide(_recalls(0.04), None, BASE)
    assert not d.promote and d.rule == "floor" and "vs best heuristic popularity 0.0500" in d.reason


def test_the_floor_is_the_best_heuristic_not_the_weakest():
    # beats popularity and repurchase, loses to trending: refused, and the reason names trending
    base = {"popularity": 0.05, "repurchase+popularity": 0.06, "trending+decayed-repurchase": 0.12}
    d = decide(_recalls(0.10), None, base)
    assert not d.promote and d.rule == "floor"
    assert d.best_baseline == "trending+decayed-repurchase" and "trending+decayed-repurchase 0.1200" in d.reason
    with pytest.raises(ValueError, match="baselines"):
        decide(_recalls(0.10), None, {})


def test_clear_win_promotes():
    champ = _recalls(0.10, seed=1)
    chall = champ.copy()
    chall[np.flatnonzero(champ == 0)[:400]] = 1.0  # +400 hits on the same customers
    d = decide(chall, champ, BASE)
    assert d.promote and d.rule == "all-passed", d.reason
    assert d.ci_low > 0 and d.lift == pytest.approx(chall.mean() / champ.mean() - 1)


def test_within_noise_keeps_champion():
    champ = _recalls(0.10, seed=1)
    chall = champ.copy()
    # swap hits between customers: same mean, pure noise
    zeros, ones = np.flatnonzero(champ == 0)[:300], np.flatnonzero(champ == 1)[:300]
    chall[zeros], chall[ones] = 1.0, 0.0
    d = decide(chall, champ, BASE, config=GateConfig(min_lift=0.0))
    assert not d.promote and d.rule == "margin"  # zero lift is not above a zero margin
    assert "CI of the gain" in d.reason and d.ci_low < 0 < d.ci_high


def test_small_real_gain_below_margin_keeps_champion():
    champ = _recalls(0.10, seed=1)
    chall = champ.copy()
    chall[np.flatnonzero(champ == 0)[:6]] = 1.0  # 6 more hits: 0.1025 -> 0.1040, +1.46%
    d = decide(chall, champ, BASE, config=GateConfig(min_lift=0.02))
    assert not d.promote and d.rule == "margin"
    assert d.reason == "keep champion (rule: margin): lift +1.46% over champion 0.1025 vs margin +2.00%"
    assert d.ci_low > 0  # the gain is real, only too small


def test_better_than_champion_but_loses_to_popularity_refused():
    champ = _recalls(0.02, seed=1)
    chall = np.maximum(champ, _recalls(0.02, seed=2))
    d = decide(chall, champ, {"popularity": 0.5})
    assert not d.promote and d.rule == "floor" and "vs best heuristic popularity 0.5000" in d.reason


def test_force_needs_reason_and_is_recorded():
    with pytest.raises(ValueError, match="reason"):
        decide(_recalls(0.01), _recalls(0.1), {"popularity": 0.5}, force_reason="  ")
    d = decide(_recalls(0.01), _recalls(0.1), {"popularity": 0.5}, force_reason="hotfix for bad champion")
    assert d.promote and d.forced and d.rule == "forced" and d.reason == "forced: hotfix for bad champion"
    assert d.as_tags()["gate.forced"] == "True"


def test_mismatched_customers_rejected():
    with pytest.raises(ValueError, match="same customers"):
        decide(_recalls(0.1, n=10), _recalls(0.1, n=11), {"popularity": 0.0})


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    a, b = _recalls(0.3, seed=3), _recalls(0.2, seed=4)
    ci1 = paired_bootstrap_ci(a, b, 500, 0.95, seed=7)
    assert ci1 == paired_bootstrap_ci(a, b, 500, 0.95, seed=7)
    assert ci1[0] < (a - b).mean() < ci1[1]
    # identical arrays: the gain is exactly zero in every resample
    assert paired_bootstrap_ci(a, a, 200, 0.9, seed=0) == (0.0, 0.0)
