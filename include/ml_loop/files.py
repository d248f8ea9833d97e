"""Content hashes and atomic writes shared by the stages that write to the data root."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

DATA_DIR_ENV = "ML_LOOP_DATA_DIR"
TMP_PREFIX = ".tmp-"


def data_root(root: str | Path | None = None) -> Path:
    """Return the data root: the argument, else ``$ML_LOOP_DATA_DIR``."""
    if root is not None:
        return Path(root)
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        raise RuntimeError(
            f"{DATA_DIR_ENV} is not set; set it to the folder that contains landing/, raw/ and "
            "snapshots/ (the local stack sets it to .stack/data)"
        )
    return Path(value)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(root: Path) -> str:
    """Hash every file under ``root`` by relative path and content, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(sha256_file(path).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def write_atomic(path: Path, write: Callable[[BinaryIO], None], suffix: str = "") -> None:
    """Call ``write`` on a temporary file beside ``path``, fsync it, then rename it to ``path``.

    Readers see the old file or the complete new one, never a partial write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder, then rename."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=str)
    write_atomic(path, lambda handle: handle.write(text.encode()))


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; rename it to ``final`` on success.

    A process killed inside the block leaves only a ``.tmp-*`` folder, which
    ``remove_stale_staging`` deletes later, so readers never see a partial ``final``. When
    ``final`` already exists (a rerun of the same inputs), the staged copy is discarded and the
    existing folder is kept.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{socket.gethostname()}@{os.getpid()}"
    staging = final.parent / f"{TMP_PREFIX}{final.name}@{owner}@{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_staging(parent: Path, max_age_s: float = 6 * 3600) -> list[Path]:
    """Delete ``.tmp-*`` entries left in ``parent`` by killed writers; return what was removed.

    An entry is stale when the process that made it, on this host, is gone, or when it is older
    than ``max_age_s`` (the writer may have run on another worker host).
    """
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        if entry.name.startswith(TMP_PREFIX) and _is_stale(entry, max_age_s):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _is_stale(entry: Path, max_age_s: float) -> bool:
    try:
        age = time.time() - entry.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > max_age_s:
        return True
    parts = entry.name.rsplit("@", 3)
    if len(parts) != 4 or parts[1] != socket.gethostname() or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
