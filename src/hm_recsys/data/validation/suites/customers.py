"""``customers.rows``: customers.csv as written, and its batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hm_recsys.data import schema
from hm_recsys.data.validation.suites.build import expect, suite

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from hm_recsys.data.validation.config import ValidationConfig


def customers_suite(config: ValidationConfig):
    """``customers.rows``: customers.csv as written (batch from ``customers_frame``)."""
    import great_expectations.expectations as gxe

    return suite(
        "customers.rows",
        [
            expect("customer_id_format", "customer ids are 64 lowercase hex chars",
                    gxe.ExpectColumnValuesToMatchRegex(column="customer_id", regex=schema.HEX64.pattern)),
            expect("customer_id_unique", "customer_id is the primary key; a duplicate makes joins ambiguous",
                    gxe.ExpectColumnValuesToBeUnique(column="customer_id")),
            expect("FN_set", "FN is 1.0 or empty in the real file",
                    gxe.ExpectColumnValuesToBeInSet(column="FN", value_set=["1.0", ""])),
            expect("Active_set", "Active is 1.0 or empty in the real file",
                    gxe.ExpectColumnValuesToBeInSet(column="Active", value_set=["1.0", ""])),
            expect("club_member_status_set", "a new status would silently become a new feature value",
                    gxe.ExpectColumnValuesToBeInSet(column="club_member_status",
                                                    value_set=sorted(schema.CLUB_MEMBER_STATUS))),
            # "None" (literal) and "NONE" are distinct values in the real file.
            expect("fashion_news_frequency_set", "a new frequency would silently become a new feature value",
                    gxe.ExpectColumnValuesToBeInSet(column="fashion_news_frequency",
                                                    value_set=sorted(schema.FASHION_NEWS_FREQUENCY))),
            expect("age_format", "age is empty or a whole number",
                    gxe.ExpectColumnValuesToMatchRegex(column="age", regex=r"^(?:[0-9]{1,3}(?:\.0+)?)?$")),
            expect("age_range", f"ages outside {schema.AGE_MIN}..{schema.AGE_MAX} are data-entry errors",
                    gxe.ExpectColumnValuesToBeBetween(column="age_years", min_value=schema.AGE_MIN,
                                                      max_value=schema.AGE_MAX), source="age"),
            expect("postal_code_format", "postal codes are 64 lowercase hex chars (hashed)",
                    gxe.ExpectColumnValuesToMatchRegex(column="postal_code", regex=schema.HEX64.pattern)),
        ],
    )


def customers_frame(raw: pd.DataFrame) -> pd.DataFrame:
    """Raw customer rows + ``age_years`` (float; NaN when empty or not a number)."""
    import pandas as pd

    out = raw.copy(deep=False)
    out["age_years"] = pd.to_numeric(raw["age"], errors="coerce")
    return out
