"""The fusion: one score per (customer, candidate) from the candidate features.

``score = sum_f weight_f * (x_f - mean_f) / scale_f`` over ``features``
(``hm_recsys.candidates.FEATURES``). The weights are fitted on the validation
week only (never the holdout): for each validation customer, a softmax over
their candidates should put its mass on the articles they bought that week
(a listwise loss with several positives, the ranking analogue of the towers'
sampled softmax), with a Gaussian prior on the weights whose pull fades as
customers accumulate. Linear, so it is fitted in a
second by L-BFGS, deterministic, and readable: a weight's sign says whether a
source helps on this data (repurchase is positive on fashion, negative on
MovieLens, where nobody rates a film twice).

A ``Fusion`` is saved with the model version (``fusion.json`` in the bundle,
``fusion.*`` MLflow params) and used by the evaluation, the gate and the
service alike (``hm_recsys.served``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hm_recsys.candidates import FEATURES, Candidates

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Fusion:
    """A fitted (or fixed) linear scoring of candidate features.

    Attributes:
        features: names, from ``FEATURES``, in weight order.
        weights / mean / scale: per feature; the score is ``((x - mean) / scale) @ weights``.
        fitted: facts of the fit (week, customers, pairs, positives, loss, recall); empty if fixed.
    """

    features: tuple[str, ...]
    weights: tuple[float, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    fitted: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ValueError(f"fusion: unknown feature(s) {unknown}; known: {list(FEATURES)}")
        if not len(self.features) == len(self.weights) == len(self.mean) == len(self.scale):
            raise ValueError("fusion: features, weights, mean and scale must have the same length")
        if not all(math.isfinite(v) for v in (*self.weights, *self.mean, *self.scale)):
            raise ValueError("fusion: weights, mean and scale must be finite")

    @classmethod
    def single(cls, feature: str) -> Fusion:
        """Rank by one feature alone (e.g. ``two_tower``: the towers' own ranking)."""
        return cls((feature,), (1.0,), (0.0,), (1.0,))

    def _columns(self) -> list[int]:
        return [FEATURES.index(f) for f in self.features]

    def score(self, cands: Candidates) -> np.ndarray:
        """``float32 (P,)``: the fused score of every candidate pair."""
        out = np.zeros(cands.features.shape[0], dtype=np.float64)
        # feature by feature, not a matrix product: a pair's score must not depend on which other
        # pairs share its batch (BLAS blocking would change the rounding), so a one-customer
        # request scores exactly as the same customer did inside the evaluation's big batch
        for col, w, m, sc in zip(self._columns(), self.weights, self.mean, self.scale):
            out += w * ((cands.features[:, col].astype(np.float64) - m) / sc)
        return out.astype(np.float32)

    # -- persistence -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fitted"] = dict(self.fitted)
        return {"format_version": FORMAT_VERSION, **{k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in d.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fusion:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"fusion format {d.get('format_version')!r}, this code reads {FORMAT_VERSION}")
        return cls(tuple(d["features"]), tuple(float(v) for v in d["weights"]),
                   tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["scale"]), dict(d.get("fitted", {})))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Fusion:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def describe(self) -> str:
        return ", ".join(f"{f} {w:+.3f}" for f, w in zip(self.features, self.weights))


def fit(cands: Candidates, labels: np.ndarray, features: Sequence[str] = FEATURES, prior: float = 10.0,
        max_iter: int = 200) -> Fusion:
    """Fit the weights by a listwise softmax loss over each customer's candidates.

    Args:
        cands: the validation customers' candidates (``candidates.generate``).
        labels: ``bool (P,)``: the customer bought the candidate in the validation week.
        features: which features to weigh.
        prior: strength of a Gaussian prior on the weights, in customers: the penalty added to the
            mean per-customer loss is ``prior / n * |w|^2`` (n = customers with a positive; features
            are standardised first, so it is scale-free). Few customers: weights stay small and stable
            across seeds; many: the data decide.

    The loss of a customer with positives P among candidates S is
    ``-mean_{p in P} log softmax_S(score)_p``; customers without a positive
    among their candidates carry no signal and are left out. Raises
    ``ValueError`` when no customer has a positive candidate.
    """
    import torch

    cols = [FEATURES.index(f) for f in features]
    x = cands.features[:, cols].astype(np.float64)
    y = np.asarray(labels, dtype=bool)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels {y.shape} do not match {x.shape[0]} candidate pairs")
    g = cands.group
    has_pos = np.bincount(g[y], minlength=cands.n_customers) > 0
    keep = has_pos[g]
    if not keep.any():
        raise ValueError("fusion fit: no validation customer has a purchase among their candidates")
    x, y, g = x[keep], y[keep], g[keep]
    _, g = np.unique(g, return_inverse=True)  # dense group ids 0..G-1
    n_groups = int(g.max()) + 1
    l2 = prior / n_groups
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = torch.from_numpy((x - mean) / scale)
    gi = torch.from_numpy(g.astype(np.int64))
    pos = torch.from_numpy(y)
    n_pos = torch.bincount(gi[pos], minlength=n_groups).double()
    w = torch.zeros(len(cols), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        s = z @ w
        # log-sum-exp per group, stabilised by the group max
        gmax = torch.full((n_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(
            0, gi, s.detach(), reduce="amax")
        lse = torch.log(torch.zeros(n_groups, dtype=torch.float64).index_add(0, gi, torch.exp(s - gmax[gi]))) + gmax
        pos_sum = torch.zeros(n_groups, dtype=torch.float64).index_add(0, gi[pos], s[pos])
        nll = (lse - pos_sum / n_pos).mean()
        return nll + l2 * (w * w).sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        final = float(loss_fn())
    weights = w.detach().numpy()
    if not np.all(np.isfinite(weights)):
        raise FloatingPointError("fusion fit diverged (non-finite weights)")
    facts = {"customers": int(n_groups), "pairs": int(x.shape[0]), "positives": int(y.sum()),
             "customers_without_positive": int((~has_pos).sum()), "loss": round(final, 6), "prior": prior,
             "l2": round(l2, 8)}
    return Fusion(tuple(features), tuple(round(float(v), 8) for v in weights),
                  tuple(float(v) for v in mean), tuple(float(v) for v in scale), facts)
