"""Writing outputs safely: temporary name beside the target, fsync, rename; a lock; a space check.

Every writer (GGUF file, MLX folder, GPTQ folder) goes through `atomic_output`, so nothing partial
ever sits under a final name and two runs cannot interleave into the same output.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from qwqq.errors import OutputError, QwqqError

SPACE_MARGIN = 64 * 2**20  # bytes kept free beyond the planned size


def temp_path(final: Path) -> Path:
    """Where the output is written while incomplete: hidden, beside the target, deterministic."""
    return final.with_name(f".{final.name}.qwqq-partial")


def journal_path(final: Path) -> Path:
    """Progress record of a resumable partial output."""
    return final.with_name(f".{final.name}.qwqq-partial.json")


def lock_path(final: Path) -> Path:
    return final.with_name(f"{final.name}.lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(final: Path) -> Path:
    lock = lock_path(final)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                raise OutputError(f"another qwqq process (pid {pid}) is writing this output", final) from None
            lock.unlink(missing_ok=True)  # stale: its writer died
            continue
        except OSError as e:
            raise OutputError(f"cannot write here: {e.strerror}", final.parent) from e
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    raise OutputError("cannot take the output lock", final)


def check_target(final: Path, force: bool, planned_bytes: int | None) -> None:
    """Fail before any work: exists without --force, unwritable folder, not enough space."""
    if final.exists() and not force:
        raise OutputError("already exists (use --force to overwrite)", final)
    if final.is_dir() and not final.is_symlink() and final.suffix == ".gguf":
        raise OutputError("is a folder", final)
    parent = final.parent
    blocker = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputError(f"{blocker} is a file, not a folder", final)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder: {e.strerror}", parent) from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError("output folder is not writable", parent)
    if planned_bytes is not None:
        free = shutil.disk_usage(parent).free
        partial = temp_path(final)
        reusable = partial.stat().st_size if partial.is_file() else 0
        if free + reusable < planned_bytes + SPACE_MARGIN:
            raise OutputError(
                f"not enough disk space: needs {planned_bytes / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free", parent)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (and SIGHUP) unwind like Ctrl-C, so the cleanup below runs; a file-size limit
    (ulimit -f) becomes an EFBIG error instead of killing the process."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    old = {}
    for sig, h in ((signal.SIGTERM, handler), (signal.SIGHUP, handler), (signal.SIGXFSZ, signal.SIG_IGN)):
        try:
            old[sig] = signal.signal(sig, h)
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


class Interrupted(OutputError):
    exit_code = 130


@contextmanager
def atomic_output(final: Path, *, force: bool, planned_bytes: int | None = None, resumable: bool = False):
    """Yield a temporary path; on success it becomes `final` (fsynced, renamed atomically).

    On an error the temporary is removed. On an interruption (Ctrl-C, SIGTERM) it is removed too,
    unless `resumable`: then it stays, with its journal, for `--resume`. After SIGKILL it stays
    anyway; the next run either resumes it or starts over it.
    """
    final = Path(final)
    check_target(final, force, planned_bytes)
    lock = _take_lock(final)
    tmp, journal = temp_path(final), journal_path(final)
    ok = interrupted = False
    try:
        with _sigterm_as_interrupt():
            yield tmp
            if tmp.is_file():
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            ok = True
    except KeyboardInterrupt:
        interrupted = True
        how = "the partial output is kept: run the same command with --resume to continue" if resumable else \
            "nothing was written"
        raise Interrupted(f"interrupted; {how}", final) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OutputError(f"disk full while writing ({e.strerror}); nothing was left behind", final) from e
        raise
    finally:
        if not ok and not (interrupted and resumable):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            journal.unlink(missing_ok=True)
        if ok:
            journal.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)


def check_not_being_written(path: Path) -> None:
    """One line if another qwqq process holds the lock of `path` (it is still being written)."""
    lock = lock_path(path)
    if lock.exists():
        raise QwqqError(f"is being written by another qwqq process (lock file {lock.name}); wait for it to finish", path)
