"""The time split: one definition shared by training, evaluation and the gate.

::

    |<------------- train_weeks ------------->|<- valid_weeks ->|<- holdout ->|
    train_start                          valid_start        holdout_start   holdout_end

* holdout: one H&M week (Wednesday..Tuesday), by default the last complete week
  in the warehouse. Champion and challenger are scored on it; it is never seen
  in training, early stopping or the fusion fit.
* valid: the week(s) right before the holdout: early stopping and the fusion
  of candidate sources are fitted there, never on the holdout. One week on
  H&M-sized data; on sparse data ``for_training`` pools more weeks so that
  a 50-customer week cannot pick the epoch (``choose_valid_weeks``).
* train: ``train_weeks`` weeks before that: the towers learn from these only.

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
        if not self.valid_start < self.holdout_start:
            raise ValueError("the validation weeks must end where the holdout week starts")

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

    @property
    def valid_weeks(self) -> int:
        return (self.holdout_start - self.valid_start).days // 7

    @property
    def last_week_start(self) -> dt.date:
        """Start of the week right before the holdout (the last validation week): "last week's" sales."""
        return self.holdout_start - WEEK

    def valid_week_starts(self) -> list[dt.date]:
        return [self.valid_start + i * WEEK for i in range(self.valid_weeks)]

    @classmethod
    def ending_at(cls, holdout_week: dt.date, train_weeks: int, valid_weeks: int = 1) -> Split:
        """The split whose holdout is the H&M week containing ``holdout_week``."""
        if train_weeks < 1 or valid_weeks < 1:
            raise ValueError(f"train_weeks and valid_weeks must be >= 1, got {train_weeks} and {valid_weeks}")
        holdout = week_start(holdout_week)
        valid = holdout - valid_weeks * WEEK
        return cls(train_start=valid - train_weeks * WEEK, valid_start=valid, holdout_start=holdout)

    @classmethod
    def from_warehouse(cls, warehouse, train_weeks: int = 12, holdout_week: dt.date | None = None,
                       valid_weeks: int = 1) -> Split:
        """Default holdout = the warehouse's last complete week; checks the data covers the split."""
        holdout = week_start(holdout_week) if holdout_week else warehouse.last_complete_week()
        split = cls.ending_at(holdout, train_weeks, valid_weeks)
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

    @classmethod
    def for_training(cls, warehouse, train_weeks: int, holdout_week: dt.date | None = None, valid_weeks: int = 0,
                     min_valid_customers: int = 1000, max_valid_weeks: int = 2) -> Split:
        """The training split: ``from_warehouse`` with ``valid_weeks`` resolved (0 = ``choose_valid_weeks``)."""
        holdout = week_start(holdout_week) if holdout_week else warehouse.last_complete_week()
        if valid_weeks == 0:
            valid_weeks = choose_valid_weeks(warehouse, holdout, min_valid_customers, max_valid_weeks)
        return cls.from_warehouse(warehouse, train_weeks, holdout, valid_weeks)

    def describe(self) -> str:
        valid = f" ({self.valid_weeks} wk)" if self.valid_weeks > 1 else ""
        return (
            f"train [{self.train_start}, {self.train_end}) ({self.train_weeks} wk), "
            f"valid [{self.valid_start}, {self.valid_end}){valid}, holdout [{self.holdout_start}, {self.holdout_end})"
        )

    def to_dict(self) -> dict[str, str]:
        return {k: v.isoformat() for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> Split:
        return cls(**{k: dt.date.fromisoformat(d[k]) for k in ("train_start", "valid_start", "holdout_start")})


def choose_valid_weeks(warehouse, holdout_start: dt.date, min_customers: int, max_weeks: int) -> int:
    """The fewest validation weeks (1..``max_weeks``) before the holdout holding ``min_customers`` buyers.

    Buyers are counted per week (a customer buying in two weeks counts
    twice: each week is scored on its own). Where even ``max_weeks`` weeks
    fall short, ``max_weeks``: training then turns early stopping off (see
    ``train.fit``) rather than let a few customers pick the epoch.
    """
    if max_weeks < 1:
        raise ValueError(f"max_valid_weeks must be >= 1, got {max_weeks}")
    total = 0
    for n in range(1, max_weeks + 1):
        week = holdout_start - n * WEEK
        tx = warehouse.transactions(week, week + WEEK, columns=["customer_id"])
        total += int(tx["customer_id"].nunique())
        if total >= min_customers:
            return n
    return max_weeks
