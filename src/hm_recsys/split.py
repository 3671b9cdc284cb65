"""The time split: one definition shared by training, evaluation and the gate.

::

    |<------------- train_weeks ------------->|<- valid ->|<- holdout ->|
    train_start                          valid_start   holdout_start   holdout_end

* holdout: one H&M week (Wednesday..Tuesday), by default the last complete week
  in the warehouse. Champion and challenger are scored on it; it is never seen
  in training or early stopping.
* valid: the week right before the holdout, used for early stopping.
* train: ``train_weeks`` weeks before that.

At prediction time for the holdout, customer history features may use every
transaction before ``holdout_start`` (the valid week included): that is
information a deployed model would have.

All bounds are half-open ``[start, end)`` dates. The split is derived from the
warehouse and explicit arguments only, never from "now", so a rerun of the
same pipeline run sees the same split.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

from hm_recsys.data.schema import week_range, week_start

WEEK = dt.timedelta(days=7)


@dataclass(frozen=True)
class Split:
    train_start: dt.date
    valid_start: dt.date
    holdout_start: dt.date

    def __post_init__(self) -> None:
        for name in ("train_start", "valid_start", "holdout_start"):
            week_range(getattr(self, name))  # raises if not a Wednesday
        if not self.train_start < self.valid_start:
            raise ValueError(f"train_start {self.train_start} must be before valid_start {self.valid_start}")
        if self.holdout_start != self.valid_start + WEEK:
            raise ValueError("the validation week must be the week right before the holdout week")

    @property
    def train_end(self) -> dt.date:
        return self.valid_start

    @property
    def valid_end(self) -> dt.date:
        return self.holdout_start

    @property
    def holdout_end(self) -> dt.date:
        return self.holdout_start + WEEK

    @property
    def train_weeks(self) -> int:
        return (self.valid_start - self.train_start).days // 7

    @classmethod
    def ending_at(cls, holdout_week: dt.date, train_weeks: int) -> Split:
        """The split whose holdout is the H&M week containing ``holdout_week``."""
        if train_weeks < 1:
            raise ValueError(f"train_weeks must be >= 1, got {train_weeks}")
        holdout = week_start(holdout_week)
        valid = holdout - WEEK
        return cls(train_start=valid - train_weeks * WEEK, valid_start=valid, holdout_start=holdout)

    @classmethod
    def from_warehouse(cls, warehouse, train_weeks: int = 12, holdout_week: dt.date | None = None) -> Split:
        """Default holdout = the warehouse's last complete week; checks the data covers the split."""
        holdout = week_start(holdout_week) if holdout_week else warehouse.last_complete_week()
        split = cls.ending_at(holdout, train_weeks)
        weeks = set(warehouse.weeks())
        missing = [w for w in split.all_weeks() if w not in weeks]
        if missing:
            have = f"{min(weeks)}..{max(weeks)}" if weeks else "none"
            raise ValueError(
                f"the warehouse lacks weeks {', '.join(map(str, missing[:5]))}"
                f"{' ...' if len(missing) > 5 else ''} needed by split {split.describe()} (weeks present: {have})"
            )
        return split

    def all_weeks(self) -> list[dt.date]:
        n = (self.holdout_end - self.train_start).days // 7
        return [self.train_start + i * WEEK for i in range(n)]

    def describe(self) -> str:
        return (
            f"train [{self.train_start}, {self.train_end}) ({self.train_weeks} wk), "
            f"valid [{self.valid_start}, {self.valid_end}), holdout [{self.holdout_start}, {self.holdout_end})"
        )

    def to_dict(self) -> dict[str, str]:
        return {k: v.isoformat() for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> Split:
        return cls(**{k: dt.date.fromisoformat(d[k]) for k in ("train_start", "valid_start", "holdout_start")})
