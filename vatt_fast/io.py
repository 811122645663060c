"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Everything the project writes that a later run reads (manifests, vocabularies, prepared
media, checkpoints, run summaries) goes through :func:`atomic_path` or
:func:`atomic_write`: the data is written to a temporary name in the same folder,
flushed to disk, then renamed into place with ``os.replace`` (atomic on POSIX), and the
folder entry itself is flushed. A crash mid-write leaves at worst a stray temporary
file named ``.tmp-<name>-<pid>-...``, which :data:`TMP_MARK` lets cleaners find.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

__all__ = ["TMP_MARK", "atomic_path", "atomic_write", "fsync_path"]

PathLike = Union[str, "os.PathLike[str]"]
TMP_MARK = ".tmp-"  # every temporary name made here starts with it
# mkstemp/mkdtemp create 0600/0700 entries; what lands under the final name gets the
# usual permissions instead (0666/0777 less the process umask), as open() would give.
_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_path(path: PathLike) -> None:
    """Flush a file's (or, for a folder, its entries') data to disk; a no-op where the OS refuses."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; when the block ends without error, move it into place.

    Args:
        final: where the file (or folder) must end up.
        directory: make the temporary path a folder (for a checkpoint holding several files);
            an existing ``final`` folder is replaced.

    The temporary name keeps ``final``'s suffix (``.tmp-<stem>-<pid>-<random><suffix>``), so
    writers that pick a format from the suffix (soundfile, FFmpeg) still do. On error the
    temporary is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stem = f"{TMP_MARK}{final.stem if not directory else final.name}-{os.getpid()}-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=stem, dir=final.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)
    else:
        fd, name = tempfile.mkstemp(prefix=stem, suffix=final.suffix, dir=final.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory:
            for child in tmp.rglob("*"):
                if child.is_file():
                    fsync_path(child)
            fsync_path(tmp)
            if final.exists():  # replace a folder: move the old one aside first
                old = Path(tempfile.mkdtemp(prefix=f"{TMP_MARK}old-{final.name}-", dir=final.parent))
                os.replace(final, old / final.name)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        else:
            fsync_path(tmp)
            os.replace(tmp, final)
        fsync_path(final.parent)  # the rename itself
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def atomic_write(path: PathLike, data: Union[str, bytes], encoding: str = "utf-8") -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding=encoding)
        else:
            tmp.write_bytes(data)
    return Path(path)
