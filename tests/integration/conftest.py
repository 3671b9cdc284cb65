"""Registered model versions for serving tests: tiny trained models in a real MLflow registry.

``served_models`` (session) trains two tiny two-tower models on the tiny
warehouse (one data preparation, two seeds, one epoch each, each with its
fusion fitted on the validation week: seconds), and publishes each the way
the pipeline does: the bundle as the run's ``bundle/`` artifact,
``Registry.register``, and a served state (``hm_recsys.served``) published
as the run's ``served/<as_of>/``. Version 1 gets a state as of one week
before the newest (so a refresh has something newer to publish) and is
promoted to champion; version 2 gets one as of the newest week and is
registered only (the swap test promotes it).

Everything lives in one session runtime folder (sqlite MLflow, artifacts,
BentoML home, a copy of the tiny warehouse); nothing touches $HOME or the
repository's var/.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hm_recsys.procs import free_port, kill_tree


@dataclass(frozen=True)
class ServedModels:
    home: Path
    versions: tuple[str, str]  # (champion at start, challenger to promote)
    known_customers: tuple[str, ...]  # customers of the customer table
    article_ids: tuple[str, ...]
    as_of: tuple[str, str]  # (v1's first state, the newest week)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a service (or CLI) process pointed at this runtime folder."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HM_RECSYS_", "MLFLOW_", "BENTOML_"))}
        env.update({
            "HM_RECSYS_HOME": str(self.home),
            "BENTOML_HOME": str(self.home / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true",
            "DO_NOT_TRACK": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1",
            "GLOG_minloglevel": "2",
        })
        env.update(extra)
        return env

    @property
    def settings(self):
        from hm_recsys.config import Settings

        return Settings.from_env({"HM_RECSYS_HOME": str(self.home)})

    def state(self, version: str, as_of: str):
        """The published served state (version, as_of), as the evaluation loads it."""
        from hm_recsys.registry import Registry
        from hm_recsys.served import ServedState

        return ServedState.load(Registry(self.settings).fetch_state(version, as_of).state_dir)


def tiny_config(seed: int):
    from hm_recsys.candidates import RetrievalConfig
    from hm_recsys.features import FeatureConfig
    from hm_recsys.model import ModelConfig
    from hm_recsys.train import Config, TrainConfig

    return Config(
        FeatureConfig(history_weeks=4, history_length=8),
        ModelConfig(embedding_dim=8, customer_layers=(32,), article_layers=(32,), output_dim=16),
        TrainConfig(train_weeks=4, epochs=1, batch_size=256, uniform_negatives=64, valid_max_customers=200,
                    threads=1, seed=seed),
        RetrievalConfig(item_to_item_weeks=4),
    )


def publish(settings, bundle_dir: Path, run_name: str, warehouse, as_of) -> str:
    """Log ``bundle_dir`` as a run's ``bundle/``, register it, build + publish its served state; the version."""
    import mlflow

    from hm_recsys import bundle
    from hm_recsys.registry import BUNDLE_ARTIFACT, Registry
    from hm_recsys.served import build_state

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    exp = mlflow.get_experiment_by_name(settings.experiment_name)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(
        settings.experiment_name, artifact_location=settings.mlflow_artifact_root.as_uri())
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as run:
        mlflow.log_artifacts(str(bundle_dir), BUNDLE_ARTIFACT)
        mlflow.log_text("serving tests log no pyfunc model", "model/MLmodel")
    reg = Registry(settings)
    version = reg.register(run.info.run_id).version
    config, fusion = bundle.retrieval(bundle_dir)
    out = settings.layout.state_dir(version, as_of.isoformat())
    build_state(bundle.load(bundle_dir), warehouse, as_of, version, out, config, fusion, progress=False)
    reg.publish_state(version, out)
    return version


@pytest.fixture(scope="session")
def served_models(tiny_warehouse_ro, tmp_path_factory) -> ServedModels:
    from hm_recsys import bundle, train
    from hm_recsys.config import Settings
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.registry import Registry
    from hm_recsys.split import Split

    home = tmp_path_factory.mktemp("serving") / "var"
    settings = Settings.from_env({"HM_RECSYS_HOME": str(home)})
    shutil.copytree(tiny_warehouse_ro, settings.layout.warehouse_dir)
    wh = Warehouse(settings.layout.warehouse_dir)
    cfg = tiny_config(seed=1)
    split = Split.from_warehouse(wh, train_weeks=cfg.train.train_weeks)
    prep = train.prepare(wh, split, cfg, home / "scratch", progress=False)
    newest = split.holdout_end  # the day after the newest ingested week
    versions = []
    for seed, as_of in ((1, split.holdout_start), (2, newest)):
        cfg = tiny_config(seed)
        model, _, _ = train.fit(prep, cfg, progress=False)
        fusion = train.fit_fusion(model, prep, cfg, wh, home / "scratch", f"seed{seed}", progress=False)
        rec = train.recommender(model, prep, prep.end_history, prep.end_raw)
        full = {"features": cfg.features.to_dict(), "model": model.config.to_dict(),
                "train": dataclasses.asdict(cfg.train), "retrieval": cfg.retrieval.to_dict()}
        out = bundle.save(home / "bundles" / f"seed{seed}", rec, full, prep.data_window,
                          {"holdout": {"served": {"recall@12": 0.0}}, "seed": seed}, fusion=fusion)
        versions.append(publish(settings, out, f"serving-test-seed{seed}", wh, as_of))
    shutil.rmtree(home / "scratch", ignore_errors=True)
    Registry(settings).promote(versions[0])
    return ServedModels(home, (versions[0], versions[1]), tuple(str(c) for c in prep.tables.customer_index[:50]),
                        tuple(str(a) for a in prep.tables.article_index),
                        (split.holdout_start.isoformat(), newest.isoformat()))


def wait_for(predicate, what: str, diagnosis, timeout: float = 300.0, every: float = 1.0):
    """Poll ``predicate`` until it returns something truthy; fail with ``diagnosis()`` at ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = predicate()
        if out:
            return out
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnosis()}")


# ---------------------------------------------------------------------------
# A real server process
# ---------------------------------------------------------------------------

class ServerProcess:
    """``hm-recsys serve`` in its own process group, stopped by PID (group) on exit."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hm_recsys.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the service was not ready within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        kill_tree(self.proc)
        self._log.close()


class Hammer:
    """Several clients POSTing /recommend in a loop; every answer and failure recorded."""

    def __init__(self, url: str, customers: list[str], clients: int = 4):
        self.url, self.customers = url, customers
        self.stop = threading.Event()
        self.answers: list[tuple[str, str, str, list[str]]] = []  # (customer, version, as_of, article ids)
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(k * 5,)) for k in range(clients)]

    def _run(self, offset: int) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=30) as c:
            i = offset
            while not self.stop.is_set():
                cid = self.customers[i % len(self.customers)]
                i += 1
                try:
                    r = c.post("/recommend", json={"customer_id": cid})
                except httpx.HTTPError as e:
                    self.failures.append(f"{cid}: {e!r}")
                    continue
                if r.status_code != 200:
                    self.failures.append(f"{cid}: {r.status_code} {r.text[:200]}")
                    continue
                out = r.json()
                self.answers.append((cid, out["model_version"], out["as_of"],
                                     [x["article_id"] for x in out["recommendations"]]))

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(1.0)
        self.stop.set()
        for t in self.threads:
            t.join()
