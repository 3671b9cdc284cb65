"""``ValidationConfig``: the tolerances of the checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hm_recsys.data import schema


@dataclass(frozen=True)
class ValidationConfig:
    """Tolerances of the checks. Defaults were measured on generated data (tiny, small, full).

    * ``volume_band``: a drop's row count must lie in ``[lo, hi] x`` the median
      row count of the ``history_weeks`` most recent warehouse weeks before it.
    * ``history_weeks``: the history the volume and never-seen checks need; with
      fewer weeks in the warehouse they are skipped with a note.
    * ``new_article_share`` / ``new_customer_share``: the share of a drop's rows
      whose article (customer) appears in no earlier transaction, ``(lo, hi)``.
      A re-keyed id column shows up as a share near 1.
    * ``price_max``: the sane ceiling of a price (prices are local price / 590;
      the real maximum is ~0.59).
    * ``max_examples``: example rows kept per failed check.
    """

    volume_band: tuple[float, float] = (0.2, 5.0)
    history_weeks: int = 4
    new_article_share: tuple[float, float] = (0.0, 0.3)
    new_customer_share: tuple[float, float] = (0.0, 0.5)
    price_max: float = schema.PRICE_MAX
    max_examples: int = 20

    def __post_init__(self) -> None:
        for name in ("volume_band", "new_article_share", "new_customer_share"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}")
        if self.history_weeks < 1:
            raise ValueError(f"history_weeks must be >= 1, got {self.history_weeks}")
        if not self.price_max > 0:
            raise ValueError(f"price_max must be > 0, got {self.price_max}")
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, got {self.max_examples}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
