"""Small file-system pieces shared by every stage that publishes files.

* ``file_sha256``: the content hash used for drops, index manifests and snapshots.
* ``staged_dir``: build a folder next to its destination and publish it with a
  rename only when the build succeeded, so readers never see half a folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def replace_dir(src: Path, dst: Path) -> None:
    """Put folder ``src`` at ``dst``; an existing ``dst`` is moved aside first and then deleted.

    ``os.replace`` cannot rename a folder onto a non-empty one; moving the old
    one aside keeps the window without any ``dst`` to two renames.
    """
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def staged_dir(dst: Path, prefix: str | None = None) -> Iterator[Path]:
    """A temporary sibling of ``dst`` to fill; it replaces ``dst`` if the block succeeds, else it is removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix or dst.name}.", dir=dst.parent))
    try:
        yield tmp
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
