"""How every suite is built: each expectation tagged with its stable check id and a one-line *why*."""

from __future__ import annotations


def expect(check: str, why: str, expectation, source: str | None = None):
    """Tag an expectation with its stable check id and its reason (shown in reports and Data Docs)."""
    expectation.meta = {"check": check, "why": why, **({"source": source} if source else {})}
    return expectation


def suite(name: str, expectations: list):
    import great_expectations as gx

    return gx.ExpectationSuite(name=name, expectations=expectations)
