"""The outcome of a check (``CheckResult``), its statuses, and the JSON they are written as.

Every check has a stable id (``CheckResult.check``), used in reports, tests
and alerts. A bad file never raises: it gets failed checks. What stops
validation from starting at all (no catalogue, a missing input) raises
``ValidationSetupError`` instead: that is no verdict on a file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Statuses of a check. "error": GX could not evaluate it (treated as a failure).
PASSED, FAILED, SKIPPED, ERROR = "passed", "failed", "skipped", "error"
_BAD = (FAILED, ERROR)


class ValidationSetupError(RuntimeError):
    """Validation cannot start (no catalogue in the warehouse, missing input): not a verdict on a file."""


@dataclass
class CheckResult:
    """The outcome of one check on one file (or, merged, on every week of the history).

    ``examples``: up to ``max_examples`` dicts; row checks give ``{"line", "value",
    "row"}`` (``row``: the raw text of each contract column), structure checks
    ``{"line", "detail", "text"}``.
    """

    check: str
    layer: str  # "drop" | "structure" | "header" | "rows"
    table: str
    status: str
    why: str
    expectation: str | None = None  # GX expectation type, None for plain-Python checks
    kwargs: dict = field(default_factory=dict)
    element_count: int | None = None
    unexpected_count: int | None = None
    observed_value: Any = None
    detail: str | None = None
    examples: list[dict] = field(default_factory=list)
    weeks: list[str] = field(default_factory=list)  # history only: weeks where it failed

    @property
    def bad(self) -> bool:
        return self.status in _BAD

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.weeks:
            d.pop("weeks")
        return d

    def merge(self, other: CheckResult, max_examples: int, week: str | None = None) -> None:
        """Fold ``other`` (the same check on another batch) into this one."""
        if other.bad and week is not None:
            self.weeks.append(week)
        order = {PASSED: 0, SKIPPED: 0, FAILED: 1, ERROR: 2}
        if order[other.status] > order[self.status]:
            self.status, self.detail = other.status, other.detail
        for name in ("element_count", "unexpected_count"):
            a, b = getattr(self, name), getattr(other, name)
            if b is not None:
                setattr(self, name, (a or 0) + b)
        if other.observed_value is not None and other.bad:
            self.observed_value = other.observed_value
        room = max_examples - len(self.examples)
        if room > 0:
            self.examples.extend(other.examples[:room])

    def short(self) -> str:
        """One clause for a human summary: what failed, how often, the first example."""
        s = self.check
        if self.unexpected_count is not None:
            unit = "line" if self.layer == "structure" else "row"
            s += f" ({self.unexpected_count} {unit}{'s' if self.unexpected_count != 1 else ''}"
            ex = self.examples[0] if self.examples else None
            if ex and ex.get("line") is not None:
                shown = repr(ex["value"]) if "value" in ex else ex.get("detail")
                s += f", e.g. line {ex['line']}: {shown}"
            s += ")"
        elif self.detail:
            s += f" ({self.detail})"
        elif self.observed_value is not None:
            s += f" (observed {self.observed_value})"
        return s


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not math.isfinite(float(o)) else float(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (dt.date, dt.datetime)):
        return o.isoformat()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _finite(v):
    """NaN/inf become null: JSON has no such numbers (and a report must stay parseable everywhere)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def to_json(obj) -> str:
    """JSON text of a report dict: numpy scalars, dates and paths made plain, NaN as null."""
    return json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), indent=2, ensure_ascii=False,
                      allow_nan=False)


def jsonable(v):
    return _finite(json.loads(json.dumps(v, default=_json_default)))
