"""Validation of the H&M files with Great Expectations, as callers import it (``hm_recsys.data.validate``).

The code lives in ``hm_recsys.data.validation``, one job a module: ``drop``
and ``history`` (the entry points), ``structure`` (plain-Python structure
checks), ``suites/`` (one suite builder a table), ``reference`` (what a drop
is compared with), ``runner`` (GX), ``reports`` (``report.json``, Data Docs,
summaries), ``results`` and ``config``. This module only hands their names on.
"""

from __future__ import annotations

from hm_recsys.data.validation.config import ValidationConfig
from hm_recsys.data.validation.drop import DROP_NAME, check_ids, declared_week, validate_drop
from hm_recsys.data.validation.history import validate_history
from hm_recsys.data.validation.reference import DropReference, IdIndex, load_reference, volume_bounds
from hm_recsys.data.validation.reports import DropReport, HistoryReport, write_report
from hm_recsys.data.validation.results import (
    ERROR,
    FAILED,
    PASSED,
    SKIPPED,
    CheckResult,
    ValidationSetupError,
    to_json,
)
from hm_recsys.data.validation.runner import GxRunner
from hm_recsys.data.validation.suites.articles import articles_frame, articles_suite
from hm_recsys.data.validation.suites.customers import customers_frame, customers_suite
from hm_recsys.data.validation.suites.header import header_suite
from hm_recsys.data.validation.suites.transactions import (
    transactions_frame,
    transactions_suite,
    week_dates,
    weekly_volume_frame,
    weekly_volume_suite,
)

__all__ = [
    "DROP_NAME",
    "ERROR",
    "FAILED",
    "PASSED",
    "SKIPPED",
    "CheckResult",
    "DropReference",
    "DropReport",
    "GxRunner",
    "HistoryReport",
    "IdIndex",
    "ValidationConfig",
    "ValidationSetupError",
    "articles_frame",
    "articles_suite",
    "check_ids",
    "customers_frame",
    "customers_suite",
    "declared_week",
    "header_suite",
    "load_reference",
    "to_json",
    "transactions_frame",
    "transactions_suite",
    "validate_drop",
    "validate_history",
    "volume_bounds",
    "week_dates",
    "weekly_volume_frame",
    "weekly_volume_suite",
    "write_report",
]
