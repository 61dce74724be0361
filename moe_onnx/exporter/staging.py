"""The temporary sibling directories an export is written into, and the clean-up of those that a
killed export (``kill -9``, a lost machine) left behind.

An export writes into ``.OUT.tmp-XXXXXXXX`` beside OUT and renames it into place when complete;
replacing an existing OUT moves the old one aside to ``.OUT.old-XXXXXXXX`` first. Each such
directory holds a marker, ``.moe-onnx-partial/owner.json``, naming the process that made it
(pid, host, process start time). A later export into the same OUT removes the directories that
match these names *and* hold the marker *and* whose owner is gone; a directory of the user's
with a similar name but no marker, or one whose export is still running, is never touched.

The marker is a directory, not a file, so that the manifest's list of the export's files (the
regular files in OUT) does not include it; it is removed once the export is in place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import psutil

log = logging.getLogger("moe_onnx.export")

MARKER = ".moe-onnx-partial"
OWNER = "owner.json"
# tempfile.mkdtemp's random part: 8 characters of [a-z0-9_].
_SUFFIX = r"[a-z0-9_]{8}"


def make_temp(out: Path) -> Path:
    """A new marked temporary directory beside ``out`` for this process to write an export into."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # mkdtemp makes it private (0700); OUT should get the permissions a plain mkdir gives.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        mark(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def old_name(out: Path, tmp: Path) -> Path:
    """Where the previous ``out`` is moved while ``tmp`` takes its place."""
    return out.with_name(f".{out.name}.old-{tmp.name[-8:]}")


def mark(directory: Path) -> None:
    """Record this process as the owner of ``directory`` (a temporary or outgoing export)."""
    marker = directory / MARKER
    marker.mkdir(exist_ok=True)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": psutil.Process().create_time()}
    (marker / OWNER).write_text(json.dumps(owner))


def unmark(directory: Path) -> None:
    shutil.rmtree(directory / MARKER, ignore_errors=True)


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary and outgoing directories of earlier exports into ``out`` whose
    process is gone; log one line for each. Returns the removed paths."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-{_SUFFIX}")
    try:
        candidates = sorted(out.parent.iterdir())
    except OSError:
        return []
    removed = []
    for path in candidates:
        if not pattern.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        owner = _owner(path)
        if owner is None or _alive(owner):
            continue
        size = _size(path)
        try:
            shutil.rmtree(path)
        except OSError as err:
            log.warning("could not remove %s, left by an export that did not finish: %s", path, err)
            continue
        log.warning("removed %s (%.1f MB), left by an export that did not finish (pid %s)",
                    path, size / 1e6, owner.get("pid"))
        removed.append(path)
    return removed


def _owner(path: Path) -> dict | None:
    """The marker's contents, or None when there is no readable marker: then it is not ours."""
    try:
        owner = json.loads((path / MARKER / OWNER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None
    return owner


def _alive(owner: dict) -> bool:
    """Whether the export that owns a directory may still be running (when unsure: yes)."""
    if owner.get("host", socket.gethostname()) != socket.gethostname():
        return True  # another machine's process (a shared filesystem): cannot tell
    try:
        proc = psutil.Process(owner["pid"])
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = owner.get("started")
        # The pid now belongs to a process that started later: the owner is gone.
        return not isinstance(started, (int, float)) or abs(proc.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, ValueError, OverflowError):
        return True


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
