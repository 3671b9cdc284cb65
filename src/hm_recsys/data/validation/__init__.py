"""Great Expectations suites for the H&M files, as code, and the machinery that runs them; one job a module.

A file is judged in three layers, each only when the one before lets it be read:

1. **structure** (``structure``: plain Python over the bytes; GX needs a
   parsed table and cannot say *why* a file does not parse): empty file,
   header-only file, wrong delimiter, non-UTF-8 lines, lines with the wrong
   number of fields, a truncated last line.
2. **header** (GX suite ``<table>.header``, ``suites/header.py``): the
   columns are present, named and ordered as in the H&M contract.
3. **rows** (GX suite ``<table>.rows``, one file per table under ``suites/``):
   types, formats, value sets, ranges, primary keys, referential integrity,
   dates of the declared week, and, for drops, volume and never-seen shares
   against the warehouse's recent weeks (``reference``).

The entry points are ``drop`` (one weekly drop) and ``history`` (the three
initial files, week by week). They use ``structure``, ``suites``,
``reference`` (what a drop is compared with), ``runner`` (GX: one context per
process, its results as ``CheckResult``) and ``reports`` (the verdicts,
their summaries, ``report.json`` and Data Docs); all of these share
``results`` and ``config``, and none imports an entry point. Callers import
``hm_recsys.data.validate``, which hands these modules' names on.
"""
