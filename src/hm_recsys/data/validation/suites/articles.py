"""``articles.rows``: articles.csv as written, and its batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hm_recsys.data import schema
from hm_recsys.data.validation.suites.build import expect, suite

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from hm_recsys.data.validation.config import ValidationConfig

_ARTICLE_NAME_COLUMNS = tuple(
    c for c in schema.ARTICLE_STR_COLUMNS if c not in ("article_id", "product_code", "colour_group_code", "detail_desc")
)


def articles_suite(config: ValidationConfig):
    """``articles.rows``: articles.csv as written (batch from ``articles_frame``)."""
    import great_expectations.expectations as gxe

    e = [
        expect("article_id_format", "article ids are 10 digits (leading zero included)",
                gxe.ExpectColumnValuesToMatchRegex(column="article_id", regex=schema.ARTICLE_ID.pattern)),
        expect("article_id_unique", "article_id is the primary key; a duplicate makes joins ambiguous",
                gxe.ExpectColumnValuesToBeUnique(column="article_id")),
        expect("product_code_format", "product codes are 7 digits",
                gxe.ExpectColumnValuesToMatchRegex(column="product_code", regex=r"^[0-9]{7}$")),
        expect("product_code_prefix", "an article id starts with its product code; a mismatch means shifted columns",
                gxe.ExpectColumnPairValuesToBeEqual(column_A="product_code", column_B="product_code_of_article_id")),
        expect("colour_group_code_format", "colour group codes are 2 digits",
                gxe.ExpectColumnValuesToMatchRegex(column="colour_group_code", regex=r"^[0-9]{2}$")),
    ]
    for c in schema.ARTICLE_INT_COLUMNS:
        e.append(expect(f"{c}_format", "integer-coded attributes must be integers (-1 means unknown)",
                         gxe.ExpectColumnValuesToMatchRegex(column=c, regex=r"^-?[0-9]+$")))
    for c in _ARTICLE_NAME_COLUMNS:
        # Only detail_desc may be empty in the real file.
        e.append(expect(f"{c}_not_empty", "only detail_desc may be empty",
                         gxe.ExpectColumnValueLengthsToBeBetween(column=c, min_value=1)))
    return suite("articles.rows", e)


def articles_frame(raw: pd.DataFrame) -> pd.DataFrame:
    """Raw article rows + ``product_code_of_article_id`` (the first 7 characters of article_id)."""
    out = raw.copy(deep=False)
    out["product_code_of_article_id"] = raw["article_id"].str.slice(0, 7)
    return out
