"""``hm-recsys deploy``: make a registered version the production artifact and the served model.

``deploy(version, settings)`` (called by the DAG after promotion, once the
version's served state as of the newest week is published; the CLI defaults
to the champion):

1. fetches the version's ``bundle/`` and its newest served state from its
   MLflow run (``Registry.fetch_state``, which verifies every checksum);
2. stores them as the BentoML model ``hm-recsys-two-tower:v<version>``
   (``bundle/`` + ``state/``, labels ``model_version`` and ``as_of``);
3. builds the Bento ``hm_recsys:v<version>`` from ``bentofile.yaml`` plus that
   model and ``HM_RECSYS_SERVE_BENTO_MODEL`` (so the containerised Bento
   serves exactly this state, without a registry; see docs/serving.md);
4. if a local service answers on ``url``, asks it to reload
   (``POST /admin/reload`` with ``HM_RECSYS_ADMIN_TOKEN``; without a token the
   service's own polling picks the change up) and waits until ``/metadata``
   reports the new version and as_of on several consecutive reads.

Idempotent: an existing model or Bento with the tag is reused (``rebuild``
replaces them), and a service already serving the version is left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hm_recsys.config import Settings

BENTO_NAME = "hm_recsys"  # = the service name in hm_recsys.service
MODEL_NAME = "hm-recsys-two-tower"
BENTOFILE = "bentofile.yaml"
# what the Bento's build context holds: name in the Bento -> path in the repository
STAGED = {"hm_recsys": "src/hm_recsys", "requirements.lock": "requirements.lock"}


class DeployError(RuntimeError):
    """Deployment could not complete; the message says what to check."""


def default_url() -> str:
    """Where tasks reach the running service: ``HM_RECSYS_SERVICE_URL`` (e.g. ``http://serve:3000`` between
    containers), else this host's ``127.0.0.1:$HM_RECSYS_SERVE_PORT``. (``HM_RECSYS_SERVE_URL`` is the
    address a browser opens, for the Airflow plugin's links; the two differ behind Docker's network.)"""
    return os.environ.get("HM_RECSYS_SERVICE_URL") or f"http://127.0.0.1:{os.environ.get('HM_RECSYS_SERVE_PORT') or 3000}"


def repo_root() -> Path:
    """The source tree holding ``bentofile.yaml`` (the package is installed editable from it)."""
    import hm_recsys

    return Path(hm_recsys.__file__).resolve().parents[2]


def bento_tag(version: str) -> str:
    return f"{BENTO_NAME}:v{version}"


def model_tag(version: str) -> str:
    return f"{MODEL_NAME}:v{version}"


def _bentoml_env(settings: Settings) -> None:
    # BentoML reads its home when first imported: set it before
    os.environ.setdefault("BENTOML_HOME", str(settings.layout.bentoml_home))
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    settings.layout.bentoml_home.mkdir(parents=True, exist_ok=True)


def store_model(version: str, bundle_dir: Path, state_dir: Path, run_id: str | None,
                rebuild: bool = False) -> tuple[str, bool]:
    """The BentoML model holding ``bundle/`` and ``state/`` (a served state); returns (tag, created)."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = model_tag(version)
    try:
        existing = bentoml.models.get(tag)
    except NotFound:
        existing = None
    if existing is not None and not rebuild:
        return tag, False
    if existing is not None:
        bentoml.models.delete(tag)
    as_of = Path(state_dir).name
    with bentoml.models.create(tag, labels={"model_version": str(version), "as_of": as_of,
                                            "mlflow_run_id": run_id or ""},
                               metadata={"files": ["bundle/", "state/"]}) as model:
        root = Path(model.path)
        shutil.copytree(bundle_dir, root / "bundle")
        shutil.copytree(state_dir, root / "state")
    return tag, True


def build_bento(version: str, model: str, rebuild: bool = False, bentofile: Path | None = None) -> tuple[str, bool]:
    """Build ``hm_recsys:v<version>`` from ``bentofile.yaml`` plus the model; returns (tag, built)."""
    import bentoml
    import yaml
    from bentoml.exceptions import NotFound

    # build() takes env entries as this (internal) attrs class, not the dicts a bentofile holds
    from bentoml._internal.bento.build_config import BentoEnvSchema

    tag = bento_tag(version)
    try:
        bentoml.bentos.get(tag)
        exists = True
    except NotFound:
        exists = False
    if exists and not rebuild:
        return tag, False
    if exists:
        bentoml.bentos.delete(tag)
    path = bentofile or repo_root() / BENTOFILE
    if not path.exists():
        raise DeployError(f"{path} not found: deploy builds the Bento from the repository's {BENTOFILE}")
    options: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    service = options.pop("service")
    options.pop("name", None)
    envs = [e for e in options.pop("envs", []) or [] if e.get("name") != "HM_RECSYS_SERVE_BENTO_MODEL"]
    envs.append({"name": "HM_RECSYS_SERVE_BENTO_MODEL", "value": model})
    labels = {**(options.pop("labels", {}) or {}), "model_version": str(version)}
    models = [*(options.pop("models", []) or []), model]
    # BentoML refuses files outside the build context, and the package lives under src/: stage a
    # context holding exactly the package and the lock file, as the Bento will see them
    root = path.parent
    with tempfile.TemporaryDirectory(prefix="hm-recsys-bento-") as tmp:
        ctx = Path(tmp)
        for name, src in STAGED.items():
            if (root / src).is_dir():
                shutil.copytree(root / src, ctx / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif (root / src).is_file():
                shutil.copy2(root / src, ctx / name)
            else:
                raise DeployError(f"{root / src} not found (needed in the Bento as {name})")
        bento = bentoml.bentos.build(service, name=BENTO_NAME, version=f"v{version}", build_ctx=str(ctx),
                                     envs=[BentoEnvSchema(**e) for e in envs], labels=labels, models=models,
                                     **options)
    return str(bento.tag), True


def _get_json(url: str, timeout: float = 5.0) -> dict[str, Any] | None:
    import httpx

    try:
        r = httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def switch_service(version: str, url: str, token: str | None, timeout: float = 300.0,
                   confirmations: int = 3, poll: float = 0.5, as_of: str | None = None) -> dict[str, Any]:
    """Make the service at ``url`` serve ``version`` (as of ``as_of``) and wait for ``/metadata`` to say so.

    ``confirmations`` consecutive reads must report it (with several
    workers each reloads on its own; one read proves only one of them).
    """
    import httpx

    url = url.rstrip("/")
    try:
        alive = httpx.get(f"{url}/livez", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        alive = False
    if not alive:
        return {"url": url, "status": "not running", "note": "it will load the champion when started"}
    def serving(meta: dict) -> bool:
        return meta.get("model_version") == version and (as_of is None or meta.get("as_of") == as_of)

    meta = _get_json(f"{url}/metadata") or {}
    if serving(meta):
        return {"url": url, "status": "already serving", "model_version": version, "as_of": meta.get("as_of")}
    t0 = time.monotonic()
    reload_note = None
    if token:
        r = httpx.post(f"{url}/admin/reload", json={}, headers={"Authorization": f"Bearer {token}"}, timeout=10.0)
        if r.status_code != 202:
            raise DeployError(f"{url}/admin/reload answered {r.status_code}: {r.text[:300]}")
    else:
        reload_note = "HM_RECSYS_ADMIN_TOKEN is not set: waiting for the service's own alias polling"
    streak = 0
    while time.monotonic() - t0 < timeout:
        meta = _get_json(f"{url}/metadata") or {}
        if serving(meta):
            streak += 1
            if streak >= confirmations:
                out = {"url": url, "status": "switched", "model_version": version, "as_of": meta.get("as_of"),
                       "previous": ((meta.get("reloader") or {}).get("last") or {}).get("previous"),
                       "seconds": round(time.monotonic() - t0, 2)}
                return {**out, "note": reload_note} if reload_note else out
        else:
            streak = 0
            failed = (meta.get("reloader") or {}).get("failed", {})
            bad = failed.get(f"{version}@{as_of}") if as_of else next(
                (v for k, v in failed.items() if k.startswith(f"{version}@")), None)
            if bad:
                raise DeployError(f"the service at {url} refused version {version}: {bad}; "
                                  f"it keeps serving {meta.get('model_version')} as of {meta.get('as_of')}")
        time.sleep(poll)
    what = f"version {version}" + (f" as of {as_of}" if as_of else "")
    raise DeployError(f"the service at {url} did not report {what} within {timeout:.0f} s "
                      f"(it reports {meta.get('model_version')} as of {meta.get('as_of')}; "
                      f"reloader: {json.dumps(meta.get('reloader'))})" + (f"; {reload_note}" if reload_note else ""))


def deploy(version: str | int | None = None, settings: Settings | None = None, *, url: str | None = None,
           token: str | None = None, timeout: float = 300.0, build: bool = True, rebuild: bool = False,
           env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Build the Bento of ``version`` (default: the champion) and switch a running local service to it.

    Returns ``{"version", "model", "bento", "built", "service": {"url", "status", ...}}``;
    ``service.status`` is ``switched``, ``already serving``, ``not running`` or
    ``skipped`` (the version is not the champion the service follows).
    """
    from hm_recsys.registry import CHAMPION, Registry

    settings = settings or Settings.from_env()
    env = os.environ if env is None else env
    reg = Registry(settings)
    champion = reg.get(CHAMPION)
    if version is None:
        if champion is None:
            raise DeployError(f"no champion in {settings.mlflow_tracking_uri}: promote a version first")
        version = champion.version
    version = str(version)
    files = reg.fetch_state(version)
    as_of = files.state_dir.name
    out: dict[str, Any] = {"version": version, "as_of": as_of}
    if build:
        _bentoml_env(settings)
        info = reg.version(version)
        model, model_created = store_model(version, files.bundle_dir, files.state_dir, info.run_id, rebuild)
        bento, built = build_bento(version, model, rebuild)
        out.update(model=model, bento=bento, built=built or model_created)
    if champion is None or champion.version != version:
        out["service"] = {"status": "skipped", "note": f"version {version} is not the champion "
                                                     f"({champion.version if champion else None}); "
                                                     f"the service follows the champion alias"}
        return out
    out["service"] = switch_service(version, url or default_url(), token or env.get("HM_RECSYS_ADMIN_TOKEN"),
                                    timeout, as_of=as_of)
    return out


def main(argv: list[str] | None = None) -> int:
    """``hm-recsys deploy``."""
    p = argparse.ArgumentParser(
        prog="hm-recsys deploy",
        description="Build the Bento hm_recsys:v<version> (model bundle + its newest served state baked in) and "
                    "switch the running local service to the version, waiting until /metadata reports it. "
                    "Idempotent.")
    p.add_argument("--version", help="registered model version (default: the champion)")
    p.add_argument("--url", help="the running service (default http://127.0.0.1:$HM_RECSYS_SERVE_PORT, port 3000)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the switch (default 300)")
    p.add_argument("--no-build", action="store_true", help="only switch the service, build no Bento")
    p.add_argument("--rebuild", action="store_true", help="rebuild the model and Bento even if the tags exist")
    a = p.parse_args(argv)
    try:
        result = deploy(a.version, url=a.url, timeout=a.timeout, build=not a.no_build, rebuild=a.rebuild)
    except (DeployError, RuntimeError, ValueError, OSError) as e:
        print(f"hm-recsys deploy: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


__all__ = ["deploy", "switch_service", "build_bento", "store_model", "DeployError", "main"]
