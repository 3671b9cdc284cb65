"""The GX suites as code, one file a table; each builds its suite and the batch (``*_frame``) it runs on.

Every expectation carries a stable check id and a one-line *why* in its
``meta`` (``build.expect``), shown in reports and in the Data Docs.
"""
