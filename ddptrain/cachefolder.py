"""The cache folder's housekeeping: what its entries are, which can no longer be used, and removing them safely.
No torch here: `ddptrain cache` lists and clears without it.

An entry is a folder named by its 32-hex key, with `{key}.lock` beside it (held while it is built or loaded; its
modification time says when it was last used) and `{key}.use` (held, shared, by every process that maps the
entry's arrays, until that process ends). An entry is removed only when both locks can be taken at once, so a job
never loses the files it maps, on this machine or on another that shares the folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCES = "sources.json"  # in each entry: [path, size, mtime_ns] of the files it was built from
KEY = re.compile(r"[0-9a-f]{32}")
HELD: list[int] = []  # this process's shared locks on the entries it maps (released when it ends)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddptrain"


def hold(cache_dir: Path, key: str) -> None:
    """Mark the entry as in use by this process until it ends (a shared lock; any number of jobs hold it)."""
    try:
        fd = os.open(cache_dir / f"{key}.use", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.utime(cache_dir / f"{key}.lock")  # last used
    except OSError:
        pass
    HELD.append(fd)


def release() -> None:
    """Let go of this process's entries, as its end does (for a process that prepares data for several jobs)."""
    while HELD:
        os.close(HELD.pop())


def unchanged(identity: list[Any]) -> bool:
    """Whether a file is still as an entry recorded it. A file whose folder is not there (a path mounted only on
    the machine that built the entry, in a cache shared by machines) counts as unchanged: only a file seen to
    change or vanish from its folder makes an entry unreachable."""
    path, size, mtime_ns = identity
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return not os.path.isdir(os.path.dirname(path))
    except OSError:
        return True
    return (stat.st_size, stat.st_mtime_ns) == (size, mtime_ns)


@dataclass(frozen=True)
class Entry:
    key: str
    kind: str  # fit, eval, predict; "eval or predict" for entries written before the kind was recorded
    sources: tuple[str, ...]  # the files it was built from
    size_bytes: int
    last_used: float  # seconds since the epoch
    stale: bool  # a file it was built from has changed or gone: its key cannot come up again
    in_use: bool  # being built, or mapped by a running job

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "sources": list(self.sources), "size_bytes": self.size_bytes,
                "last_used": self.last_used, "stale": self.stale, "in_use": self.in_use}


def entries(cache_dir: Path) -> list[Entry]:
    """The folder's entries, most recently used first. Anything not shaped like an entry is not listed."""
    if not cache_dir.is_dir():
        return []
    found = []
    for folder in cache_dir.iterdir():
        if not is_entry(folder):
            continue
        try:
            identities = json.loads((folder / SOURCES).read_text())
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            identities, meta = [], {}
        kind = "fit" if "spec" in meta else meta.get("purpose", "eval or predict")
        lock = cache_dir / f"{folder.name}.lock"
        found.append(Entry(folder.name, kind, tuple(str(i[0]) for i in identities if isinstance(i, list) and i),
                           _size(folder), _mtime(lock) or _mtime(folder),
                           not all(unchanged(i) for i in identities if isinstance(i, list) and len(i) == 3),
                           _busy(cache_dir, folder.name)))
    return sorted(found, key=lambda e: -e.last_used)


def is_entry(folder: Path) -> bool:
    """A folder of ddptrain's: a 32-hex name, and its files or its lock there (so that a --cache-dir pointed at a
    folder of the user's lists and removes nothing of theirs)."""
    return (KEY.fullmatch(folder.name) is not None and folder.is_dir()
            and ((folder / "meta.json").exists() or (folder / SOURCES).exists()
                 or folder.with_name(f"{folder.name}.lock").exists()))


def remove(cache_dir: Path, key: str) -> bool:
    """Remove an entry unless it is being built or mapped by a job (then False: it is left as it is). OSError where
    it cannot be removed (permissions, a read-only folder)."""
    locks = []
    try:
        for name in (f"{key}.lock", f"{key}.use"):
            locks.append(os.open(cache_dir / name, os.O_RDWR | os.O_CREAT, 0o644))
            try:
                fcntl.flock(locks[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        if (cache_dir / key).exists():
            shutil.rmtree(cache_dir / key)
        for name in (f"{key}.lock", f"{key}.use"):
            (cache_dir / name).unlink(missing_ok=True)
        return True
    finally:
        for fd in locks:
            os.close(fd)


def remove_leftovers(cache_dir: Path) -> int:
    """Remove the half-built folders of builders that were killed outright (their build lock is free)."""
    removed = 0
    for tmp in cache_dir.glob("*.tmp-*"):
        key = tmp.name.split(".tmp-")[0]
        if not KEY.fullmatch(key) or not tmp.is_dir():
            continue
        try:
            fd = os.open(cache_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
        except OSError:
            pass  # being built right now
        finally:
            os.close(fd)
    return removed


def prune_changed(cache_dir: Path, keep: str) -> int:
    """Remove the entries (other than `keep`) built from a file that has since changed or been deleted: their keys
    cannot come up again. One in use is left for a later build. Returns how many were removed."""
    removed = 0
    for entry in entries(cache_dir):
        if entry.stale and entry.key != keep:
            try:
                removed += remove(cache_dir, entry.key)
            except OSError:  # not ours to remove (permissions): the job goes on
                pass
    return removed


def _busy(cache_dir: Path, key: str) -> bool:
    for name in (f"{key}.lock", f"{key}.use"):
        path = cache_dir / name
        if not path.exists():
            continue
        try:
            fd = os.open(path, os.O_RDWR)  # an exclusive lock over NFS needs a file open for writing
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
    return False


def _size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512  # on disk (the arrays may be sparse)
            except OSError:
                pass
    return total


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# -- `ddptrain cache` ------------------------------------------------------------------------------------------------
def cache_command(cache_dir: Path, prune: bool, clear: bool, json_out: bool) -> None:
    """List the entries, or remove the stale ones (--prune) or all of them (--clear); entries in use stay."""
    import time

    from ddptrain.console import console

    before = entries(cache_dir)
    removed: list[Entry] = []
    if prune or clear:
        from ddptrain.errors import DDPTrainError

        try:
            remove_leftovers(cache_dir)
            removed = [e for e in before if (clear or e.stale) and remove(cache_dir, e.key)]
        except OSError as exc:
            raise DDPTrainError(f"cannot remove from the cache {cache_dir}: {exc.strerror or exc} "
                                f"({exc.filename or cache_dir}); check that folder's permissions") from None
    gone = {e.key for e in removed}
    left = [e for e in before if e.key not in gone]
    if json_out:
        console.out.print_json(data={"cache_dir": str(cache_dir), "entries": [e.to_dict() for e in left],
                                     "removed": [e.to_dict() for e in removed]})
        return
    if prune or clear:
        kept = [e for e in left if e.in_use and (clear or e.stale)]
        freed = _human(sum(e.size_bytes for e in removed))
        console.out.print(f"ddptrain cache: removed {_count(len(removed))} ({freed}) from {cache_dir}"
                          + (f"; {_count(len(kept))} in use kept" if kept else ""), markup=False)
        return
    if not left:
        console.out.print(f"ddptrain cache: no entries in {cache_dir}", markup=False)
        return
    # one line an entry and its files on their own lines, whole (a table column would cut a long path)
    console.out.print(f"{cache_dir}: {_count(len(left))}, {_human(sum(e.size_bytes for e in left))}", markup=False)
    for e in left:
        state = "in use" if e.in_use else "stale: a file changed or went" if e.stale else "current"
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        console.out.print(f"  {e.key[:12]}  {e.kind:<7} {_human(e.size_bytes):>10}  last used {used}  {state}",
                          markup=False)
        for source in e.sources:
            console.out.print(f"      {source}", markup=False)
    console.out.print("remove stale entries with `ddptrain cache --prune`, all with `ddptrain cache --clear`",
                      markup=False)


def _count(n: int) -> str:
    return f"{n:,} entr{'y' if n == 1 else 'ies'}"


def _human(size: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1000
    return f"{size:,.1f} TB"
