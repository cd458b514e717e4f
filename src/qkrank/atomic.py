"""Write-to-temporary-then-rename, so a killed job never leaves a half-written file under the real name."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Below this, a failed write is taken for a full disk: torch's zip writer and HDF5 report one as "file write
# failed" or "unexpected pos", without the errno.
FULL_DISK_FREE_BYTES = 1 << 20


class DiskFullError(OSError):
    """A write that failed because its file system is full; the message names the file and the free space."""


def _disk_full(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place, on error delete it.

    A write that fails on a full file system raises ``DiskFullError`` naming ``path``, whatever library wrote.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        free = shutil.disk_usage(path.parent).free
        if not isinstance(e, DiskFullError) and (_disk_full(e) or free < FULL_DISK_FREE_BYTES):
            raise DiskFullError(errno.ENOSPC, f"No space left on device while writing '{path}' ({free:,} bytes "
                                              f"free once the partial file was removed); free space and rerun "
                                              f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
