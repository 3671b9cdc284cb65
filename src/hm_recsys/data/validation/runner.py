"""Running GX suites: one ephemeral context per process (``GxRunner``), results turned into ``CheckResult``s.

GX is slow to import (~5 s here): it is imported only when a GX layer runs,
and one context serves the whole process. Nothing is written anywhere but
the Data Docs folder a caller asks for. The batch's index *is* the file's
line number, so GX's ``partial_unexpected_index_list`` names lines directly
and each failed check carries example rows as the file wrote them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hm_recsys.data.validation.results import ERROR, FAILED, PASSED, CheckResult, jsonable

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


class GxRunner:
    """Runs suites on pandas batches in one ephemeral GX context and builds Data Docs on demand.

    Creating a context and importing GX costs seconds, so one runner serves a
    whole process (``GxRunner.shared()``); suites are re-registered under
    their name on every run, so a suite built for another week replaces the
    previous one. Results stay in the context's in-memory store until
    ``build_docs`` renders the ones asked for into a folder.
    """

    _shared: GxRunner | None = None

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self._gx = gx
        self.ctx = gx.get_context(mode="ephemeral")
        # GX's own tqdm bars ("Calculating Metrics") would flood logs once per batch.
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        self._source = self.ctx.data_sources.add_pandas("hm_recsys")
        self._batches: dict[str, Any] = {}
        self._fixed: dict[tuple[str, str], Any] = {}
        self._sites = 0

    @classmethod
    def shared(cls) -> GxRunner:
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def _batch_definition(self, asset: str):
        if asset not in self._batches:
            a = self._source.add_dataframe_asset(asset)
            self._batches[asset] = a.add_batch_definition_whole_dataframe("whole")
        return self._batches[asset]

    def run(self, suite, frame: pd.DataFrame, asset: str, run_name: str, max_examples: int, fixed: bool = False):
        """Validate ``frame`` against ``suite``. Returns ``(result, result_identifier)``.

        ``fixed``: the suite never changes under its name (a header suite), so
        the registered one is reused (registering costs ~0.1 s of GX bookkeeping).
        A suite name must be run either always fixed or never.
        """
        from great_expectations.core.run_identifier import RunIdentifier

        gx = self._gx
        vd = self._fixed.get((suite.name, asset)) if fixed else None
        if vd is None:
            suite = self.ctx.suites.add_or_update(suite)
            vd = self.ctx.validation_definitions.add_or_update(
                gx.ValidationDefinition(name=f"{suite.name}@{asset}", data=self._batch_definition(asset), suite=suite)
            )
            if fixed:
                self._fixed[(suite.name, asset)] = vd
        run_id = RunIdentifier(run_name=run_name, run_time=dt.datetime.now(dt.UTC))
        result = vd.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": max(max_examples, 1)},
            run_id=run_id,
        )
        key = next(
            k
            for k in self.ctx.validation_results_store.list_keys()
            if k.run_id == run_id and k.expectation_suite_identifier.name == suite.name
        )
        return result, key

    def build_docs(self, result_ids: Sequence, folder: Path) -> Path:
        """Render the given results (and an index) as GX Data Docs HTML into ``folder``; returns index.html."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._sites += 1
        site = f"site{self._sites}"
        self.ctx.add_data_docs_site(
            site,
            {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "show_how_to_buttons": False,
            },
        )
        try:
            self.ctx.build_data_docs(site_names=[site], resource_identifiers=list(result_ids))
        finally:
            self.ctx.delete_data_docs_site(site)
        return folder / "index.html"

    def forget(self, result_ids: Sequence) -> None:
        """Drop results from the in-memory store (a long history run would otherwise keep them all)."""
        store = self.ctx.validation_results_store
        for k in result_ids:
            store.remove_key(k)


def _exception_message(info) -> str | None:
    """GX puts either one ``{"raised_exception", "exception_message"}`` or one per metric here."""
    if not info:
        return None
    if "raised_exception" in info:
        return info.get("exception_message") if info.get("raised_exception") else None
    msgs = [v.get("exception_message") for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
    return "; ".join(m for m in msgs if m) or None


def checks_from_result(
    result, layer: str, table: str, raw: pd.DataFrame | None, max_examples: int
) -> list[CheckResult]:
    """Turn a GX suite result into CheckResults, with example rows taken from ``raw`` by line number."""
    out = []
    for r in result.results:
        cfg = r.expectation_config
        meta = dict(cfg.meta or {})
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
        res = r.result or {}
        err = _exception_message(r.exception_info)
        status = ERROR if err else (PASSED if r.success else FAILED)
        c = CheckResult(
            check=meta.get("check", cfg.type),
            layer=layer,
            table=table,
            status=status,
            why=meta.get("why", ""),
            expectation=cfg.type,
            kwargs=jsonable(kwargs),
            element_count=res.get("element_count"),
            unexpected_count=res.get("unexpected_count"),
            observed_value=jsonable(res.get("observed_value")),
            detail=err,
        )
        if status == FAILED:
            idx = res.get("partial_unexpected_index_list") or []
            source = meta.get("source") or kwargs.get("column")
            for i in idx[:max_examples]:
                if isinstance(i, dict):  # a named index comes back as {index name: label, column: value}
                    i = i.get(raw.index.name) if raw is not None else i
                if raw is None or isinstance(i, dict) or i not in raw.index:
                    c.examples.append({"key": jsonable(i)})
                    continue
                row = raw.loc[i]
                ex = {"line": int(i)} if raw.index.name == "line" else {raw.index.name or "key": jsonable(i)}
                if source in raw.columns:
                    ex["value"] = jsonable(row[source])
                ex["row"] = {k: jsonable(row[k]) for k in raw.columns}
                c.examples.append(ex)
        out.append(c)
    return out
