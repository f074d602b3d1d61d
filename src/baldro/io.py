"""Atomic file output: a crash, Ctrl-C or `kill -9` never leaves a half-written result behind.

Files and folders get the user's umask (a shared results folder stays readable to colleagues), and
`RunLock` keeps two runs out of one folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from baldro.errors import BaldroError

log = logging.getLogger(__name__)


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path, folder: bool = False) -> None:
    """Give a file made by `mkstemp` (0600) or a folder made by `mkdtemp` (0700) the permissions
    that `open` / `mkdir` would have given it: 0666 / 0777 less the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def apply_umask_tree(folder: str | Path) -> None:
    """`apply_umask` to a folder and everything in it (libraries that save through `mkstemp`)."""
    mask = current_umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _jsonable(obj: Any) -> Any:
    """NaN/inf become null so that every file we write is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        apply_umask(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(_jsonable(obj), indent=indent, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(_jsonable(r), ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | Path, row: Any) -> None:
    """Append one JSON line (logs grow line by line; a torn last line is skipped by `read_jsonl`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_jsonable(row), ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[Any]:
    """Read a JSON-lines file; a torn final line (from an interrupted run) is ignored, any other bad
    line is an error naming its line number."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise BaldroError(f"{path} is not UTF-8 text: it is not a JSON-lines log") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise BaldroError(f"{path} line {i + 1} is not valid JSON ({e.msg}): the log is damaged") from None
    return rows


def truncate_jsonl(path: str | Path, keep: Callable[[Any], bool]) -> int:
    """Rewrite a JSON-lines log atomically with only the rows that `keep` accepts (and without a torn
    last line); returns how many rows were dropped. A missing file is left missing."""
    path = Path(path)
    if not path.exists():
        return 0
    rows = read_jsonl(path)
    kept = [r for r in rows if keep(r)]
    if len(kept) != len(rows) or path.read_bytes()[-1:] not in (b"", b"\n"):
        write_jsonl_atomic(path, kept)
    return len(rows) - len(kept)


# ----------------------------------------------------------------------------- run lock
def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), to tell a reused pid from the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class RunLock:
    """An exclusive lock on a folder, held while a run writes into it.

    The lock is an OS file lock (`flock`) on `FOLDER/.baldro.lock`, which the kernel releases when its
    process dies, so a lock left by a killed run (`kill -9`, a lost node) is stale and taken over; the
    file names the owner (host, pid, start time) for the message a second run gets.
    """

    NAME = ".baldro.lock"

    def __init__(self, folder: str | Path, what: str = "run"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / self.NAME
        self._fd: int | None = None

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                owner = self._owner()
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["time"])) if "time" in owner else "?"
                raise BaldroError(
                    f"{self.folder} is in use by another baldro {owner.get('what', 'run')} (pid {owner.get('pid', '?')} "
                    f"on {owner.get('host', '?')}, started {since}): wait for it to finish or choose another output_dir"
                ) from None
            # The file may have been removed by its previous owner between our open and our lock.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = self._owner()  # a released lock's file is removed: one that is left is stale
            if old.get("pid"):
                log.info(
                    "%s: taking over the lock of a %s that ended without releasing it (pid %s)",
                    self.folder,
                    old.get("what", "run"),
                    old.get("pid"),
                )
            me = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "start": _process_start(os.getpid()),
                "time": time.time(),
                "what": self.what,
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            self._fd = fd
            return self
        raise BaldroError(f"could not lock {self.folder}: another process keeps replacing {self.path}")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
