"""Child processes started by PID and stopped by PID: the service in tests and benchmarks.

BentoML's arbiter starts each worker in a session of its own, so signalling
the arbiter's process group does not reach the workers; ``kill_tree`` records
every descendant first and finishes them off after the group had its grace
period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM ``proc``'s process group (started with ``start_new_session=True``), then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    below = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    for pid in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def hostname() -> str:
    """The name a process reports as its host: ``HM_RECSYS_HOSTNAME``, else the machine's FQDN.

    Airflow's ``[core] hostname_callable`` for the production stack on one
    machine, where two Celery workers share the FQDN but stand for two hosts:
    each task instance then records which worker ran it.
    """
    return os.environ.get("HM_RECSYS_HOSTNAME") or socket.getfqdn()
