"""A run directory's lock file: created atomically with the owner's PID, refused while that process lives, taken
over when it is gone (a SIGKILLed or crashed run leaves its lock behind)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from .atomic import temp_path

LOCK_FILE = "train.lock"


class RunLocked(RuntimeError):
    """Another live process holds the run directory."""


def pid_alive(pid: int) -> bool:
    """os.kill(pid, 0) semantics: True when a process with this PID exists (even one we may not signal)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_record() -> bytes:
    return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}) + "\n").encode()


def _read_owner(path: Path) -> dict[str, Any] | None:
    """The lock's record, or None when it is unreadable (being written, or damaged)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _create(path: Path) -> bool:
    """Create the lock with our record in one step (link a complete temporary file: O_EXCL semantics, and
    nobody ever sees an empty lock). False if a lock exists."""
    tmp = temp_path(path)        # a fresh name: a leftover of a killed process (same PID or not) is no obstacle
    try:
        os.chmod(tmp, 0o644)
        fd = os.open(tmp, os.O_WRONLY)
        try:
            os.write(fd, _owner_record())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:                         # a filesystem without hard links: plain O_EXCL create
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(_owner_record())
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _take_over(path: Path, stale: dict[str, Any] | None) -> bool:
    """Replace a stale lock by ours, unless someone else did first: the stale file is renamed away (atomic, so
    only one process gets it) and must still hold the record judged stale; then ours is created."""
    grabbed = path.with_name(f".{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, grabbed)
    except FileNotFoundError:
        return _create(path)                    # gone meanwhile: try the normal way
    if _read_owner(grabbed) != stale:
        # Another process replaced the stale lock between our read and our rename: give it back.
        with contextlib.suppress(FileExistsError):
            os.link(grabbed, path)
        grabbed.unlink()
        return False
    grabbed.unlink()
    return _create(path)


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold DIR/train.lock for the block; raises RunLocked naming the owner when a live process has it. A lock
    whose PID is dead on this host is taken over. Released (removed) on exit if it is still ours."""
    path = Path(directory) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        if _create(path):
            break
        owner = _read_owner(path)
        if owner is None and path.exists() and time.time() - path.stat().st_mtime < 5:
            time.sleep(0.2)                      # a plain-create lock being written: look again
            continue
        host = owner.get("host") if owner else None
        if owner and host == socket.gethostname() and pid_alive(owner["pid"]) and owner["pid"] != os.getpid():
            raise RunLocked(f"{directory} is in use by process {owner['pid']} (lock file {path}); wait for that "
                            "training to end or stop it; if no training runs there, delete the lock file")
        if owner and host != socket.gethostname():
            raise RunLocked(f"{directory} is locked by process {owner['pid']} on host {host!r} (lock file {path}); "
                            "this host cannot tell whether it still runs: delete the lock file if it does not")
        if _take_over(path, owner):
            break
    else:
        raise RunLocked(f"could not take the lock {path}: other processes keep changing it")
    try:
        yield path
    finally:
        owner = _read_owner(path)
        if owner is not None and owner["pid"] == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
