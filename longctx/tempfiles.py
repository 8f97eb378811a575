"""Temporary files of writes in progress: named after their writer, locked while written, deleted once stale.

A token cache or a saved decoder state (tens to hundreds of MB) is written under a temporary name beside its final
name and renamed into place, so that a half-written file is never read. A process killed in the middle leaves the
temporary behind. Each write therefore happens in a temporary folder ``.tmp-NAME-PID`` named after its writer and
locked (``flock``) by it while it is used; the operating system drops the lock when the process dies. (A folder, not
a file: safetensors itself writes to a randomly named temporary and renames it, and that one lands in the folder
too.) A temporary is stale -- and deleted by the next write into the same folder -- only when both say its writer is
gone: its lock is free and no process on this machine has its pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

TEMP_NAME = re.compile(r"^\.tmp-(?P<name>.+)-(?P<pid>\d+)$")
NAME_CHARS = 64  # of the final name in the temporary's: a final name near the system's limit still has a temporary


def temp_path(path: Path) -> Path:
    """The temporary folder for writing ``path`` in this process."""
    return path.with_name(f".tmp-{path.name[:NAME_CHARS]}-{os.getpid()}")


@contextlib.contextmanager
def locked_temp(path: Path) -> Iterator[Path]:
    """A file name inside a new temporary folder beside ``path``, locked by this process while the block writes the
    file and renames it into place. The folder, with whatever a failed write left in it, is deleted afterwards."""
    folder = temp_path(path)
    shutil.rmtree(folder, ignore_errors=True)  # this process's own leftover
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder / path.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # a read-only folder must not hide the write's own error
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(folder: Path, name: str | None = None, pattern: re.Pattern[str] = TEMP_NAME) -> list[Path]:
    """Delete the temporaries in ``folder`` (those of ``name`` only, if given) whose writer is gone: no process
    with the pid in the name, and the file's lock free (a writer on another machine sharing the folder holds it).
    ``pattern`` must have a ``pid`` group (and a ``name`` group when ``name`` is given). Returns what was deleted."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    removed = []
    for path in entries:
        match = pattern.match(path.name)
        if match is None or (name is not None and match.group("name") != name[:NAME_CHARS]):
            continue
        pid = int(match.group("pid"))
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
        except OSError:  # locked by a live writer elsewhere, or already gone
            pass
        finally:
            os.close(fd)
    return removed
