"""The MLflow model registry as this project uses it: one registered model, aliases.

* Every trained model becomes a version of one registered model
  (``Settings.registered_model_name``). Registration is idempotent on a key
  (the Airflow run id, or the MLflow run id): a retried task finds the version
  it already made instead of creating a second one.
* Aliases, never stages: ``challenger`` (the latest candidate),
  ``champion`` (what serving loads), ``previous-champion`` (what rollback
  restores).
* Promotion and rollback hold a lock so concurrent promoters serialize, and
  read the aliases back to verify. The lock is a file under the runtime folder
  (one host: CLI, LocalExecutor, containers sharing a host). Across hosts,
  ``hm_retrain``'s ``max_active_runs=1`` keeps one promoter at a time; see
  docs/registry.md for a one-slot pool if promotions also come from elsewhere.
* The champion history is kept as a JSON list in the registered model's tag
  ``champion_history`` so a rollback knows what came before.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from hm_recsys.config import Settings
from hm_recsys.fsutil import staged_dir

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS = "previous-champion"
HISTORY_TAG = "champion_history"
IDEMPOTENCY_TAG = "idempotency_key"


BUNDLE_ARTIFACT = "bundle"  # run artifact path of the model bundle
INDEX_ARTIFACT = "index"  # run artifact path of the version's ScaNN index


class RegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class VersionFiles:
    """A registered version materialised on local disk: everything serving needs."""

    version: str
    bundle_dir: Path
    index_dir: Path


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    run_id: str | None
    source: str
    tags: dict[str, str]

    @classmethod
    def of(cls, mv) -> VersionInfo:
        return cls(mv.name, str(mv.version), mv.run_id, mv.source, dict(mv.tags or {}))


class Registry:
    def __init__(self, settings: Settings | None = None):
        import mlflow
        from mlflow import MlflowClient

        self.settings = settings or Settings.from_env()
        mlflow.set_tracking_uri(self.settings.mlflow_tracking_uri)
        mlflow.set_registry_uri(self.settings.mlflow_tracking_uri)
        self.client = MlflowClient(self.settings.mlflow_tracking_uri, self.settings.mlflow_tracking_uri)
        self.name = self.settings.registered_model_name

    # -- reads ------------------------------------------------------------------
    def _ensure_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            with contextlib.suppress(MlflowException):  # a concurrent creator won the race
                self.client.create_registered_model(
                    self.name, description="Two-tower H&M retrieval model: customer + article towers, ScaNN index."
                )

    def get(self, alias: str) -> VersionInfo | None:
        """The version an alias points to, or None if the alias (or the model) does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return VersionInfo.of(self.client.get_model_version_by_alias(self.name, alias))
        except MlflowException:
            return None

    def version(self, version: str | int) -> VersionInfo:
        return VersionInfo.of(self.client.get_model_version(self.name, str(version)))

    def aliases(self) -> dict[str, str]:
        from mlflow.exceptions import MlflowException

        try:
            return {k: str(v) for k, v in self.client.get_registered_model(self.name).aliases.items()}
        except MlflowException:
            return {}

    def history(self) -> list[str]:
        from mlflow.exceptions import MlflowException

        try:
            tags = self.client.get_registered_model(self.name).tags
        except MlflowException:
            return []
        return json.loads(tags.get(HISTORY_TAG, "[]"))

    # -- writes -----------------------------------------------------------------
    def register(
        self,
        run_id: str,
        model_uri: str | None = None,
        idempotency_key: str | None = None,
        tags: Mapping[str, object] | None = None,
    ) -> VersionInfo:
        """Register the run's model as a new version, or return the version this key already made.

        ``idempotency_key`` defaults to the MLflow run id; the DAG passes its
        Airflow run id so a retried task never registers twice. The new
        version gets the ``challenger`` alias.
        """
        key = idempotency_key or run_id
        with self.lock():
            self._ensure_model()
            found = self.client.search_model_versions(f"name='{self.name}' and tags.{IDEMPOTENCY_TAG}='{key}'")
            if found:
                mv = max(found, key=lambda m: int(m.version))
            else:
                all_tags = {IDEMPOTENCY_TAG: key, **{k: str(v) for k, v in (tags or {}).items()}}
                mv = self.client.create_model_version(
                    self.name, model_uri or f"runs:/{run_id}/model", run_id=run_id, tags=all_tags
                )
            self.client.set_registered_model_alias(self.name, CHALLENGER, mv.version)
        return VersionInfo.of(mv)

    def tag(self, version: str | int, tags: Mapping[str, object]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(self.name, str(version), k, str(v))

    def promote(self, version: str | int) -> dict[str, str]:
        """Make ``version`` the champion; the old champion becomes previous-champion.

        Idempotent: promoting the current champion again changes nothing.
        Returns the aliases read back after the change.
        """
        version = str(version)
        with self.lock():
            self.version(version)  # raises if it does not exist
            current = self.get(CHAMPION)
            if current is None or current.version != version:
                history = self.history()
                if current is not None:
                    self.client.set_registered_model_alias(self.name, PREVIOUS, current.version)
                self.client.set_registered_model_alias(self.name, CHAMPION, version)
                self.client.set_registered_model_tag(self.name, HISTORY_TAG, json.dumps([*history, version]))
            return self._verify(expect_champion=version)

    def rollback(self) -> dict[str, str]:
        """Restore the previous champion. The demoted version is tagged ``rolled_back=true``."""
        with self.lock():
            history = self.history()
            current = self.get(CHAMPION)
            if current is None or len(history) < 2 or history[-1] != current.version:
                raise RegistryError(
                    f"nothing to roll back to: champion={current.version if current else None}, history={history}"
                )
            restored, rest = history[-2], history[:-1]
            self.client.set_registered_model_alias(self.name, CHAMPION, restored)
            if len(rest) >= 2:
                self.client.set_registered_model_alias(self.name, PREVIOUS, rest[-2])
            else:
                self.client.delete_registered_model_alias(self.name, PREVIOUS)
            self.client.set_registered_model_tag(self.name, HISTORY_TAG, json.dumps(rest))
            self.client.set_model_version_tag(self.name, current.version, "rolled_back", "true")
            return self._verify(expect_champion=restored)

    def _verify(self, expect_champion: str) -> dict[str, str]:
        aliases = self.aliases()
        history = self.history()
        if aliases.get(CHAMPION) != expect_champion or (history and history[-1] != expect_champion):
            raise RegistryError(f"alias read-back failed: expected champion {expect_champion}, got {aliases}")
        prev = aliases.get(PREVIOUS)
        if prev is not None and (len(history) < 2 or history[-2] != prev):
            raise RegistryError(f"previous-champion {prev} disagrees with history {history}")
        return aliases

    def fetch(self, version: str | int) -> VersionFiles:
        """Local ``bundle/`` and ``index/`` of a version, downloaded from its MLflow run once.

        The run's artifacts ``bundle/`` and ``index/`` are the source of truth;
        the copy under ``models/<version>/`` is a cache, written to a temporary
        folder and renamed, so a half-finished download is never used. The index
        manifest's model version is checked against ``version``.
        """
        import mlflow

        from hm_recsys.index import verify_index

        mv = self.version(version)
        if mv.run_id is None:
            raise RegistryError(f"version {mv.version} has no MLflow run to fetch artifacts from")
        root = self.settings.layout.model_dir(mv.version)
        if not (root / "bundle").is_dir() or not (root / "index").is_dir():
            try:
                with staged_dir(root) as tmp:
                    for art in (BUNDLE_ARTIFACT, INDEX_ARTIFACT):
                        mlflow.artifacts.download_artifacts(
                            run_id=mv.run_id, artifact_path=art, dst_path=str(tmp),
                            tracking_uri=self.settings.mlflow_tracking_uri,
                        )
            except Exception as e:
                raise RegistryError(f"cannot fetch version {mv.version} (run {mv.run_id}): {e}") from e
        verify_index(root / "index", expected_model_version=mv.version)
        return VersionFiles(mv.version, root / "bundle", root / "index")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        path: Path = self.settings.home / "locks" / f"registry-{self.name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
