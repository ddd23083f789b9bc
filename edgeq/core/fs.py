"""Crash-safe outputs: an export, a plan or an imatrix is either absent or complete at its path, never torn.

* Everything is written under a temporary name beside the output, flushed to disk (fsync) and renamed into
  place, so a process killed at any point (`kill -9`, power loss after the rename) leaves either nothing new
  or a finished output. A bundle replaced with `--force` is swapped in one step where the kernel can
  (renameat2 RENAME_EXCHANGE), so the path always holds one complete bundle.
* An output path is locked (`output_lock`, an flock beside it) from the first check until the rename: a
  second edgeq writing the same path at the same time stops at once with one line, never mixes files.
* What a killed run left (`.NAME.partial-*` folders, `.NAME.*.tmp` files) is removed by the next run that
  writes the same path, once it holds the lock.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from edgeq.core.errors import EdgeqError


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk, so a rename after it publishes finished bytes."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files of `path` left by processes that are gone (a killed write)."""
    for p in path.parent.glob(f".{path.name}.*.tmp"):
        parts = p.name[len(path.name) + 2:].split(".")
        if parts and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            try:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink()
            except OSError:
                pass


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the file at a temporary path beside `path`; it is flushed and renamed into place."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of an output path (`.NAME.lock` beside it) or fail at once naming the process that has it.

    The lock file is removed on release; an acquirer checks that the file it locked is still the one at the
    path, so a release racing a new acquire never leaves two holders.
    """
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    lock = parent / f".{out.name}.lock"
    while True:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise EdgeqError(out, f"cannot write here ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            try:
                holder = lock.read_text().strip() or "?"
            except OSError:
                holder = "?"
            raise EdgeqError(out, f"is being written by another edgeq process (pid {holder}); wait for it to "
                                  "finish or write elsewhere") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)      # released and removed between our open and our lock: take the new file
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            lock.unlink()
        except OSError:
            pass
        os.close(fd)


def check_output_dir(out: str | os.PathLike, force: bool) -> Path:
    """Fail before any work if the output folder cannot be created where asked."""
    out = Path(out)
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise EdgeqError(parent, "is a file, cannot create the output folder under it")
        if parent.exists():
            break
    if out.exists() and any(out.iterdir()) and not force:
        raise EdgeqError(out, "already exists and is not empty (pass --force to replace it)")
    return out


def _remove_stale_stages(out: Path) -> None:
    """Folders a killed export of `out` left beside it. Only called with `out`'s lock held."""
    for pattern in (f".{out.name}.partial-*", f".{out.name}.old-*"):
        for p in out.parent.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)
    remove_stale_temporaries(out)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the kernel or libc cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


@contextmanager
def staged_dir(out: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; it becomes `out` only if the block succeeds.

    Call it with `out`'s `output_lock` held (export does), so that no other edgeq stages the same path.
    """
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        check_output_dir(out, force)       # something else may have written there meanwhile
        if out.exists():
            if _exchange(tmp, out):
                shutil.rmtree(tmp, ignore_errors=True)      # now the old bundle
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / "x")
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Read into one reused buffer: a new bytes object per chunk cost page faults on every read (a runtime checks
    an adapter's file on each switch that reads it: 20 % of a 20 MB file's check, measured)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def source_files(path: str | os.PathLike) -> list[Path]:
    """The files a source model consists of: the file itself, or a folder's regular files (not hidden)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def sha256_source(path: str | os.PathLike) -> str:
    """SHA-256 of a model file; for a folder, of its listing "<file sha256>  <name>\n" sorted by name."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    listing = "".join(f"{sha256_file(p)}  {p.name}\n" for p in source_files(path))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def source_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in source_files(path))
