"""Run directories: atomic writes, verified checkpoints, an exclusive lock, and names that never collide.

- Every file a reader may see is written to a temporary file, fsynced and renamed; a failed write
  (disk full, file size limit) removes its temporary file and says what could not be written.
- A checkpoint carries a SHA-256 of its own content (every tensor's bytes, every value), computed
  when it is written and checked when it is read, and the one before it is kept beside it: bytes
  damaged on disk are caught, the previous checkpoint is used with a warning, and a run with no
  intact checkpoint is refused, naming the files.
- A run directory is held by one process at a time for the life of the run (an advisory `flock`
  on RUN/.lock, which the kernel releases when the holder dies, so a killed run never keeps it).
- Default names are claimed with an exclusive mkdir, so two runs started in the same second get
  two directories.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from gossiplab.runfolder import RunFolder
from gossiplab.safeload import PlainDataFileError, UnsafeFileError, load_tensors, plain_error

WRITE_PROBE = ".gossiplab-write-test"  # the file `gossiplab run` writes and removes to test a run directory
LOCK_FILE = ".lock"
DIGEST_KEY = "sha256"  # the checkpoint's digest of its own content
PREVIOUS = "checkpoint.previous.pt"


class RunDirError(ValueError):
    """The run directory cannot be used as asked; nothing in it was changed."""


class UnsafeCheckpointError(RunDirError):
    """A checkpoint holds pickled code: refused outright, never silently replaced by an older one."""


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write `data` (bytes, or a function writing into the open file) to a temporary file, fsync,
    then rename: a reader never sees a half-written file. A failed write leaves no temporary file
    and raises RunDirError naming the file and the cause."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RunDirError(
            f"cannot write {path} ({error.strerror or error}); everything written before it is intact"
        ) from error


def atomic_save(obj: object, path: Path) -> None:
    """torch.save, written atomically, straight into the file (no copy of a checkpoint of
    gigabytes in memory)."""
    atomic_write(path, lambda handle: _save_into(obj, handle))


def _save_into(obj: object, handle: BinaryIO) -> None:
    """torch.save into an open file. Its zip writer reports a failed write (a full disk, a file
    size limit) as a RuntimeError that only chains the OSError: give the OSError back, so the
    caller sees one line naming the file and the cause."""
    try:
        torch.save(obj, handle)
    except RuntimeError as error:
        cause = error.__cause__ or error.__context__
        if isinstance(cause, OSError):
            raise cause from None
        raise


def content_digest(value: Any) -> str:
    """SHA-256 over a checkpoint's content in a fixed order: dict keys sorted, tensors by dtype,
    shape and bytes, everything else by repr. Independent of how torch lays out the file."""
    digest = hashlib.sha256()

    def feed(item: Any) -> None:
        if isinstance(item, dict):
            digest.update(b"{")
            for key in sorted(item, key=repr):
                digest.update(repr(key).encode())
                feed(item[key])
            digest.update(b"}")
        elif isinstance(item, list | tuple):
            digest.update(b"[")
            for element in item:
                feed(element)
            digest.update(b"]")
        elif isinstance(item, torch.Tensor):
            digest.update(f"{item.dtype}{tuple(item.shape)}".encode())
            digest.update(item.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy
        else:
            digest.update(repr(item).encode())

    feed(value)
    return digest.hexdigest()


def write_checkpoint(state: dict[str, Any], path: Path) -> None:
    """The checkpoint with the digest of its content, atomically; the one it replaces is kept as
    checkpoint.previous.pt, the fallback if this one is ever found damaged."""
    if path.is_file():
        os.replace(path, path.with_name(PREVIOUS))
    atomic_save({**state, DIGEST_KEY: content_digest(state)}, path)


def drop_fallback(path: Path) -> None:
    """A finished run resumes from nowhere but its last checkpoint: the fallback beside it goes
    (half of what a sweep's or a reproduction's finished runs hold on disk)."""
    path.with_name(PREVIOUS).unlink(missing_ok=True)


def verified_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint whose content matches its digest; RunDirError naming what is wrong otherwise."""
    try:
        state = load_tensors(path, "checkpoint")
    except UnsafeFileError as error:
        raise UnsafeCheckpointError(str(error)) from error
    except PlainDataFileError as error:
        raise RunDirError(str(error)) from error
    if not isinstance(state, dict) or DIGEST_KEY not in state or "step" not in state:
        raise RunDirError(f"{path} is not a gossiplab checkpoint (no content digest)")
    written = state.pop(DIGEST_KEY)
    if written != content_digest(state):
        raise RunDirError(f"{path} is damaged: its content does not match the digest written with it")
    return state


def read_checkpoints(newest: Path, warn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The intact checkpoints of a run, newest first (checkpoint.pt, then checkpoint.previous.pt);
    a damaged one is skipped with a warning. Refuses when checkpoints exist but none is intact, and
    whenever one holds pickled code (tampering is not a fault to work around)."""
    states, problems = [], []
    for path in (newest, newest.with_name(PREVIOUS)):
        if path.is_file():
            try:
                states.append(verified_checkpoint(path))
            except UnsafeCheckpointError:
                raise
            except RunDirError as error:
                problems.append(str(error))
    if problems and not states:
        raise RunDirError(f"no intact checkpoint to resume from: {'; '.join(problems)}")
    for problem in problems:
        warn(f"{problem}; resuming from the checkpoint before it (step {states[0]['step']})")
    return states


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a last line cut short by a crash mid-append is dropped."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for index, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            if index < len(lines) - 1:
                raise RunDirError(f"{path} line {index + 1} is corrupt") from None
            continue
        rows.append(row)
    return rows


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run's summary.json; RunDirError if it is missing, cut short or not a summary."""
    path = RunFolder(run_dir).summary
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{run_dir} holds no finished run (no summary.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunDirError(
            f"{path} cannot be read ({plain_error(error)}); the run's metrics.jsonl may still hold its rows"
        ) from None
    if not isinstance(summary, dict) or "status" not in summary:
        raise RunDirError(f"{path} is not a gossiplab summary")
    return summary


class RunDirLock:
    """Exclusive use of a run directory by one process for the life of a run (see the module doc)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._handle: Any = None

    def check_free(self) -> None:
        """Refuse if a live process holds the directory; creates nothing (no lock file, no folder)."""
        if self.path.is_file():
            with open(self.path) as handle:
                self._try_lock(handle)
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _try_lock(self, handle: Any) -> None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunDirError(
                f"run directory {self.path.parent} is in use by {holder}; wait for it to finish, "
                "or choose another --run-dir"
            ) from None

    def acquire(self) -> None:
        handle = open(self.path, "a+")  # noqa: SIM115 (held open for the life of the run)
        try:
            self._try_lock(handle)
        except BaseException:
            handle.close()
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"gossiplab pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the flock
            self._handle = None


def claim_new_dir(base: Path) -> Path:
    """A new directory named `base`, or `base-2`, `base-3`, ... if taken: created exclusively, so
    concurrent callers (two runs started in the same second) never share one."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 10_000):
        candidate = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RunDirError(f"no free directory name next to {base}")


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse a directory that holds a finished run, or an unfinished one unless resuming."""
    folder = RunFolder(run_dir)
    if resume and not folder.config.is_file():
        raise RunDirError(f"--resume {run_dir}: no config.toml there, so there is nothing to resume")
    if folder.summary.is_file():
        raise RunDirError(f"run directory {run_dir} already holds a finished run; choose another --run-dir")
    # (another process of a distributed run may be probing that it can write here)
    ignored = (WRITE_PROBE, LOCK_FILE)
    if not resume and run_dir.exists() and any(not p.name.startswith(ignored) for p in run_dir.iterdir()):
        if folder.config.is_file():
            raise RunDirError(
                f"run directory {run_dir} already holds an unfinished run; continue it with "
                f"'gossiplab run --resume {run_dir}' or choose another --run-dir"
            )
        entries = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(ignored))
        raise RunDirError(
            f"run directory {run_dir} is not empty and holds no run ({len(entries)} entries, e.g. {entries[0]!r}); "
            "a new run needs a new or empty folder: choose another --run-dir"
        )
