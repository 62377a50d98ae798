"""A training run directory: the files a run writes there, the new-run and --overwrite rules, and metrics.jsonl
rewritten atomically at every log (so a kill never leaves half a line)."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import write_text
from .runlock import LOCK_FILE

LATEST, FINAL, METRICS, CONFIG = "checkpoint-latest.pt", "checkpoint-final.pt", "metrics.jsonl", "config.json"


class RunDirError(RuntimeError):
    """A run directory that a new run may not use as asked (a usage error)."""


def _metric_step(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def trim_metrics(path: Path, last_step: int) -> list[str]:
    """The records up to the checkpoint we resume from (the killed run may have logged further), rewritten
    atomically; unreadable lines (from a file written by an older version mid-append) are dropped."""
    if not path.exists():
        return []
    keep = []
    for line in path.read_text().splitlines():
        step = _metric_step(line)
        if step is not None and step <= last_step:
            keep.append(line)
    write_metrics(path, keep)
    return keep


def write_metrics(path: Path, lines: list[str]) -> None:
    """metrics.jsonl rewritten whole and atomically at every log (it is small): never a partial line."""
    write_text(path, "".join(line + "\n" for line in lines))


# Files a run writes in its directory: what --overwrite may remove (nothing else).
RUN_FILES = (LATEST, FINAL, METRICS, CONFIG)


def _foreign_entries(out: Path) -> list[str]:
    """Entries of a run directory that the trainer did not write (they stop --overwrite)."""
    foreign = []
    for p in sorted(out.iterdir()):
        if p.name in RUN_FILES or p.name == LOCK_FILE or (p.name.startswith(".") and p.name.endswith(".tmp")):
            continue
        if p.name == "samples" and p.is_dir() and all(q.name.startswith("step-") and q.suffix == ".png"
                                                      for q in p.iterdir()):
            continue
        foreign.append(p.name)
    return foreign


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """A new run needs an empty directory, or --overwrite of a previous run's (whose files are then removed)."""
    if resume or not out.exists():
        return
    entries = [p.name for p in sorted(out.iterdir()) if p.name != LOCK_FILE]
    if not entries:
        return
    if not overwrite:
        raise RunDirError(f"{out} is not empty (it holds {', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''})"
                         "; pass --resume to continue the run there, --overwrite to replace it with a new run, "
                         "or choose another --out")
    foreign = _foreign_entries(out)
    if foreign:
        raise RunDirError(f"--overwrite replaces a previous run only, and {out} also holds {', '.join(foreign[:5])}; "
                         "choose another --out")
    for name in entries:
        p = out / name
        if p.is_dir():
            for q in p.iterdir():
                q.unlink()
            p.rmdir()
        else:
            p.unlink()
