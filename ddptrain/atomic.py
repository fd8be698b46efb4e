"""Atomic file replacement: the one place that writes a temporary file beside the target and renames it over.

A crash, a kill or Ctrl-C at any instant leaves either the old file or the new one, never a torn one, and no
temporary file is left behind by an exception (KeyboardInterrupt included).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def check_new_file(out: Path, overwrite: bool, sources: dict[str, Path], flag: str = "--out") -> None:
    """Refuse an output path (given as `flag`) that cannot or must not be written: a folder, a missing or read-only
    folder, an existing file without --overwrite, or one of the command's own inputs (named in `sources`)."""
    from ddptrain.errors import DDPTrainError

    if out.is_dir():
        raise DDPTrainError(f"{flag} {out} is a folder; pass a file path inside it")
    if not out.parent.is_dir():
        raise DDPTrainError(f"{flag} {out}: folder {out.parent} does not exist; create it or pick another path")
    if not os.access(out.parent, os.W_OK):
        raise DDPTrainError(f"{flag} {out}: folder {out.parent} is not writable; pick another path")
    for name, given in sources.items():
        if out.exists() and given.exists() and out.resolve() == given.resolve():
            raise DDPTrainError(f"{flag} {out} is the {name} itself; --overwrite would destroy it; pick another path")
    if out.exists() and not overwrite:
        raise DDPTrainError(f"{flag} {out} already exists; pass --overwrite or pick another path")


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def replacing(path: Path, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """`with replacing(path) as handle:` write to `handle`; on a clean exit it is fsynced and renamed over `path`."""
    tmp = temp_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    with replacing(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` becomes a second name for `src`'s current contents (a hard link where the filesystem allows)."""
    tmp = temp_name(dst)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
