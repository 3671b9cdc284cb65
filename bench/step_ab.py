"""Benchmark: this checkout's training step against another revision's, alternating step by step in one process.

    .venv/bin/python bench/step_ab.py --against HEAD~3            # 40 steps each, full-scale shapes
    .venv/bin/python bench/step_ab.py --against 58b2492 --steps 60 --repeat 3

On a shared host the speed of memory-bound work drifts by 20-40% within
minutes (the same step measured 77 and 147 ms an hour apart here), so two
``bench/train.py`` runs minutes apart cannot resolve a 5-10% change. This
runs both steps in one process on the same random full-shape batches
(``bench/train.py``'s ``random_batches``), alternating which goes first, and
reports the median of the per-pair ratios new / old: both sides of a pair
see the same moment of the host.

The other revision's ``src/hm_recsys`` is taken with ``git archive`` into a
temporary folder and imported as ``hm_recsys_against`` (its imports
rewritten), so both packages live side by side. Both models start from the
same seed; the weights' sha256 after the steps says whether the change kept
the arithmetic bit for bit (``SAME``) or only up to rounding (``DIFFERENT``:
then compare quality, ``bench/quality.py``).

Caveat: both sides share the process, so whatever one side leaves running
slows the other too. A version that ran its optimizer on extra Python threads
measured 0.98 here and was 30-40% slower alone (each thread's OpenMP team
spun against the other side's matrix products as much as its own). Confirm a
win with ``bench/train.py`` run alone, alternating revisions.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import train as bench_train  # noqa: E402  (bench/train.py: shapes and random batches)
from hm_recsys import train as T  # noqa: E402

ALIAS = "hm_recsys_against"


def import_revision(rev: str, into: Path):
    """``hm_recsys.train`` of git revision ``rev``, imported as ``hm_recsys_against.train``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src/hm_recsys"],
                             capture_output=True, check=False)
    if archive.returncode:
        raise SystemExit(f"git archive {rev}: {archive.stderr.decode().strip()}")
    tar_path = into / "src.tar"
    tar_path.write_bytes(archive.stdout)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    pkg = into / ALIAS
    (into / "src" / "hm_recsys").rename(pkg)
    word = re.compile(r"\bhm_recsys\b")
    for f in pkg.rglob("*.py"):
        f.write_text(word.sub(ALIAS, f.read_text()))
    sys.path.insert(0, str(into))
    import importlib

    return importlib.import_module(f"{ALIAS}.train"), importlib.import_module(f"{ALIAS}.model")


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for v in model.state_dict().values():
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def compare(against: str, steps: int, threads: int) -> tuple[float, str]:
    with tempfile.TemporaryDirectory(prefix="step-ab-") as tmp:
        TA, MA = import_revision(against, Path(tmp))
        config = T.load_config(None, [f"train.threads={threads}"])
        config_a = TA.load_config(None, [f"train.threads={threads}"])
        torch.set_num_threads(threads)
        batches = bench_train.random_batches(config, steps + 2)
        batches_a = [TA.Batch(**{f.name: getattr(b, f.name) for f in dataclasses.fields(b)}) for b in batches]
        mc = bench_train.resolved(config)
        torch.manual_seed(0)
        new = bench_train.TwoTower(mc)
        new_opts = T.make_optimizers(new, config)
        torch.manual_seed(0)
        old = MA.TwoTower(MA.ModelConfig.from_dict(mc.to_dict()))
        old_opts = TA.make_optimizers(old, config_a)
        sides = {"new": (T, new, new_opts, batches, config), "old": (TA, old, old_opts, batches_a, config_a)}
        times: dict[str, list[float]] = {"new": [], "old": []}
        with T.training_kernels(threads):
            for i in range(steps + 2):
                for side in (("new", "old") if i % 2 else ("old", "new")):
                    mod, model, opts, bs, cfg = sides[side]
                    t0 = time.perf_counter()
                    mod.train_step(model, opts, bs[i], cfg)
                    times[side].append(time.perf_counter() - t0)
        t_new, t_old = np.array(times["new"][2:]), np.array(times["old"][2:])
        same = weights_digest(new) == weights_digest(old)
        ratio = float(np.median(t_new / t_old))
        print(f"  {against}: median {np.median(t_old) * 1e3:6.1f} ms | this checkout: median "
              f"{np.median(t_new) * 1e3:6.1f} ms | per-pair new / old: median {ratio:.3f} "
              f"(IQR {np.percentile(t_new / t_old, 25):.3f}-{np.percentile(t_new / t_old, 75):.3f}, {t_new.size} pairs) "
              f"| weights after {steps + 2} steps: {'SAME' if same else 'DIFFERENT'}")
        return ratio, "SAME" if same else "DIFFERENT"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, help="git revision to compare this checkout's step with")
    p.add_argument("--steps", type=int, default=40, help="timed steps per side (after 2 warm-up steps)")
    p.add_argument("--repeat", type=int, default=1, help="fresh processes' worth of comparisons (default 1)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    print(f"== training step, this checkout vs {a.against}, alternating in one process (full-scale shapes, "
          f"{a.threads} threads)")
    if a.repeat == 1:
        compare(a.against, a.steps, a.threads)
        return 0
    ratios = []
    for _ in range(a.repeat):  # each in its own process: allocator and caches start fresh
        out = subprocess.run([sys.executable, __file__, "--against", a.against, "--steps", str(a.steps),
                              "--threads", str(a.threads)], capture_output=True, text=True, check=True).stdout
        print(out.splitlines()[-1])
        ratios.append(float(re.search(r"new / old: median ([0-9.]+)", out).group(1)))
    print(f"per-pair new / old over {a.repeat} processes: {', '.join(f'{r:.3f}' for r in ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
