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
* Promotion is compare-and-set: ``promote(version, expected_champion=...)``
  refuses (``ChampionMoved``) and changes nothing when the champion is not the
  one the gate judged (a rollback or another promotion in between).
* Served states (``hm_recsys.served``) are artifacts of the version's run
  under ``served/<as_of>/``; the version's tags ``served_as_of`` (the newest)
  and ``served_states`` (all, JSON) say which exist. ``publish_state`` holds
  the served-state lock, so there is one writer at a time, and never moves
  ``served_as_of`` back to an older date.
* The index search setting chosen on the holdout's truth when the gate state
  was built is the version's tag ``index_search`` (JSON,
  ``index.carry_payload``); later served states of the version start from it
  (``index.SearchSetting``).
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
STATE_ARTIFACT = "served"  # run artifact folder of the version's served states: served/<as_of>/
SERVED_AS_OF_TAG = "served_as_of"
SERVED_STATES_TAG = "served_states"
INDEX_SEARCH_TAG = "index_search"  # JSON: the index search setting chosen on truth at the gate (index.carry_payload)


class RegistryError(RuntimeError):
    pass


class ChampionMoved(RegistryError):
    """The champion is no longer the one a decision was made against; nothing was changed."""


_ANY = object()  # promote(): no compare-and-set


@dataclass(frozen=True)
class VersionFiles:
    """A registered version materialised on local disk: its bundle (and a served state, when fetched)."""

    version: str
    bundle_dir: Path
    state_dir: Path | None = None

    @property
    def as_of(self):
        import datetime as dt

        return dt.date.fromisoformat(self.state_dir.name) if self.state_dir is not None else None


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
                source = model_uri or f"runs:/{run_id}/model"
                # A tracking server (not a local store) refuses a logged model's models:/m-<id> source
                # unless the request names that model too.
                model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
                mv = self.client.create_model_version(self.name, source, run_id=run_id, tags=all_tags,
                                                      model_id=model_id)
            self.client.set_registered_model_alias(self.name, CHALLENGER, mv.version)
        return VersionInfo.of(mv)

    def tag(self, version: str | int, tags: Mapping[str, object]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(self.name, str(version), k, str(v))

    def promote(self, version: str | int, expected_champion: object = _ANY) -> dict[str, str]:
        """Make ``version`` the champion; the old champion becomes previous-champion.

        ``expected_champion``: the champion (version string, or None for "no
        champion") the decision was made against; if the alias points
        elsewhere now, ``ChampionMoved`` is raised and nothing changes.
        Idempotent: promoting the current champion again changes nothing.
        Returns the aliases read back after the change.
        """
        version = str(version)
        with self.lock():
            self.version(version)  # raises if it does not exist
            current = self.get(CHAMPION)
            now = current.version if current else None
            if expected_champion is not _ANY and now != version:
                expected = None if expected_champion is None else str(expected_champion)
                if now != expected:
                    raise ChampionMoved(
                        f"the champion moved since the gate judged version {version} against "
                        f"{'no champion' if expected is None else f'version {expected}'}: it is now "
                        f"{'none' if now is None else f'version {now}'}; nothing was changed. Run the gate again "
                        f"(hm-recsys gate --version {version}) to judge it against the current champion")
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
        """The local ``bundle/`` of a version, downloaded from its MLflow run once.

        The run's artifact ``bundle/`` is the source of truth; the copy under
        ``models/<version>/bundle`` is a cache, written to a temporary folder
        and renamed, so a half-finished download is never used.
        """
        import mlflow

        mv = self.version(version)
        if mv.run_id is None:
            raise RegistryError(f"version {mv.version} has no MLflow run to fetch artifacts from")
        dest = self.settings.layout.model_dir(mv.version) / BUNDLE_ARTIFACT
        if not dest.is_dir():
            try:
                with staged_dir(dest) as tmp:
                    mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=BUNDLE_ARTIFACT,
                                                        dst_path=str(tmp),
                                                        tracking_uri=self.settings.mlflow_tracking_uri)
                    flatten_download(tmp, BUNDLE_ARTIFACT)
            except Exception as e:
                raise RegistryError(f"cannot fetch the bundle of version {mv.version} (run {mv.run_id}): {e}") from e
        return VersionFiles(mv.version, dest)

    # -- served states -------------------------------------------------------------
    def served_states(self, version: str | int) -> list[str]:
        """The as_of dates (ISO) of the version's published served states, oldest first."""
        return sorted(json.loads(self.version(version).tags.get(SERVED_STATES_TAG, "[]")))

    def served_as_of(self, version: str | int) -> str | None:
        """The newest published served state's as_of (ISO) of a version, None if none yet."""
        return self.version(version).tags.get(SERVED_AS_OF_TAG) or None

    def publish_state(self, version: str | int, state_dir: Path) -> dict[str, object]:
        """Log a served state as ``served/<as_of>/`` of the version's run and advance ``served_as_of``.

        Under the served-state lock (one writer at a time). Idempotent: a state
        already published for that as_of is not uploaded again. ``served_as_of``
        only moves forward: publishing an older as_of keeps the newer one
        (returns ``{"current": False}``).
        """
        import mlflow

        from hm_recsys.served import StateError, read_manifest

        version = str(version)
        m = read_manifest(state_dir)
        if m["model_version"] != version:
            raise StateError(f"{state_dir}: a state of version {m['model_version']}, not {version}")
        as_of = m["as_of"]
        with self.lock("served-state"):
            mv = self.version(version)
            states = sorted(json.loads(mv.tags.get(SERVED_STATES_TAG, "[]")))
            if as_of not in states:
                mlflow.set_tracking_uri(self.settings.mlflow_tracking_uri)
                self.client.log_artifacts(mv.run_id, str(state_dir), f"{STATE_ARTIFACT}/{as_of}")
                states = sorted({*states, as_of})
                self.client.set_model_version_tag(self.name, version, SERVED_STATES_TAG, json.dumps(states))
            newest = mv.tags.get(SERVED_AS_OF_TAG) or ""
            current = as_of >= newest
            if as_of > newest:
                self.client.set_model_version_tag(self.name, version, SERVED_AS_OF_TAG, as_of)
            return {"version": version, "as_of": as_of, "current": current,
                    "served_as_of": max(as_of, newest), "states": states}

    def fetch_state(self, version: str | int, as_of: str | None = None) -> VersionFiles:
        """A version's bundle and one of its served states (default: the newest), on local disk, verified."""
        import mlflow

        from hm_recsys.served import read_manifest, verify_files

        files = self.fetch(version)
        mv = self.version(version)
        as_of = as_of or mv.tags.get(SERVED_AS_OF_TAG)
        if not as_of:
            raise RegistryError(f"version {mv.version} has no published served state yet "
                                f"(hm-recsys refresh, or deploy after promotion, publishes one)")
        dest = self.settings.layout.state_dir(mv.version, as_of)
        if not dest.is_dir():
            try:
                with staged_dir(dest) as tmp:
                    mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=f"{STATE_ARTIFACT}/{as_of}",
                                                        dst_path=str(tmp),
                                                        tracking_uri=self.settings.mlflow_tracking_uri)
                    flatten_download(tmp, f"{STATE_ARTIFACT}/{as_of}")
            except Exception as e:
                raise RegistryError(f"cannot fetch the served state of version {mv.version} as of {as_of} "
                                    f"(run {mv.run_id}): {e}") from e
        verify_files(dest, read_manifest(dest))
        return VersionFiles(mv.version, files.bundle_dir, dest)

    @contextlib.contextmanager
    def lock(self, what: str = "registry") -> Iterator[None]:
        """An exclusive ``flock`` on ``locks/<what>-<model>.lock`` under the runtime folder."""
        path: Path = self.settings.layout.locks_dir / f"{what}-{self.name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def flatten_download(tmp: Path, artifact_path: str) -> None:
    """``download_artifacts`` puts ``a/b/`` under ``tmp/b``: move its content up to ``tmp``."""
    inner = tmp / Path(artifact_path).name
    if not inner.is_dir():
        raise RegistryError(f"the download of {artifact_path!r} holds no folder {inner.name!r}")
    for child in list(inner.iterdir()):
        child.rename(tmp / child.name)
    inner.rmdir()
