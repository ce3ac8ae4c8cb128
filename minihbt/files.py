"""Writing files so that an interruption never leaves a half-written one, and hashing them.

Every writer in minihbt goes through `atomic_path`: the content is written to a temporary
name beside the target and renamed into place (`os.replace` is atomic on one filesystem),
so a reader sees the old file or the new one, never a torn one.
"""
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

try:
    import fcntl
except ImportError:          # not POSIX (Windows): exclusive_lock cannot exclude other processes
    fcntl = None


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error remove it.

        with atomic_path("x.npz") as tmp:
            np.savez(tmp, a=a)
    """
    base, ext = os.path.splitext(path)
    tmp = f"{base}.tmp-{os.getpid()}{ext}"        # keep the extension: np.savez appends .npz otherwise
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


LOCKING = fcntl is not None     # whether exclusive_lock excludes other processes on this platform


@contextlib.contextmanager
def exclusive_lock(path, wait=False):
    """Yield True while this process holds an exclusive lock on the file `path` (created if
    missing, never removed), or False at once if another process holds it (with `wait`, wait
    for it instead). The lock is advisory (flock): it excludes only processes that ask for it,
    and it ends with the process, so a killed holder leaves nothing stale behind. Where flock
    does not exist (LOCKING False: not POSIX), always True: nothing is excluded."""
    if not LOCKING:
        yield True
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            held = False
        try:
            yield held
        finally:
            if held:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


PRESENCE = ".process-"


@contextlib.contextmanager
def presence(folder):
    """Mark this process as working in `folder` while the block runs: a file
    `folder/.process-<host>-<pid>-<random>.lock` it holds locked and removes at the end (one a
    killed process leaves is unlocked and no longer counts). Yields a function returning how
    many processes are marked now, this one included."""
    os.makedirs(folder, exist_ok=True)
    mine = os.path.join(folder, f"{PRESENCE}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.lock")
    try:
        with exclusive_lock(mine, wait=True):        # a probe (live_processes) holds it only for an instant
            yield lambda: 1 + live_processes(folder, exclude=mine)
    finally:
        Path(mine).unlink(missing_ok=True)


def live_processes(folder, exclude=None):
    """How many processes hold a presence mark in `folder` (see `presence`); 0 where flock does
    not exist. A probe opens each mark read-only (never creating one) and takes a shared lock,
    which only a live owner's exclusive lock refuses."""
    if not LOCKING or not os.path.isdir(folder):
        return 0
    names = [n for n in os.listdir(folder) if n.startswith(PRESENCE) and n.endswith(".lock")]
    return sum(is_locked(os.path.join(folder, n)) for n in names if os.path.join(folder, n) != exclude)


def is_locked(path):
    """Whether another process holds an exclusive lock on `path` now (False where flock does not
    exist or the file does not). The probe opens it read-only, never creating it, and takes a
    shared lock for an instant, which only an exclusive holder refuses."""
    if not LOCKING:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:                        # never locked, or its owner just removed it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)                                 # closing releases the probe's lock


def write_text(path, text):
    """Write a str atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json(path, obj, indent=2):
    """Write a JSON document atomically (UTF-8, non-ASCII kept)."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def copy_file(src, dst):
    """Copy src to dst atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def sha256_file(path):
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_digest():
    """sha256 of minihbt's own source files (this package, subpackages included): a cache key part
    that changes whenever the code that computed a cached result may have."""
    root, h = os.path.dirname(os.path.abspath(__file__)), hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def stat_digest(path):
    """A cheap fingerprint of a big file: sha256 of its name, size and modification time."""
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


def make_folders(path):
    """os.makedirs(path, exist_ok=True); returns the folders it created, parents first."""
    missing, parent = [], os.path.abspath(path)
    while not os.path.exists(parent):
        missing.insert(0, parent)
        parent = os.path.dirname(parent)
    os.makedirs(path, exist_ok=True)
    return missing


def remove_empty_folders(folders):
    """Remove those of `folders` (parents before children, as make_folders lists them) that are empty."""
    for folder in reversed(folders):
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def value_digest(value):
    """sha256 (32 hex digits) of a JSON-able value, keys sorted (arrays by their values, other
    objects by repr): equal settings give equal digests on every process."""
    as_json = json.dumps(value, sort_keys=True, default=lambda v: v.tolist() if hasattr(v, "tolist") else repr(v))
    return hashlib.sha256(as_json.encode()).hexdigest()[:32]


def git_info(root):
    """{"commit": HEAD of the repository at root, "dirty": tracked files differ from it}; None
    for both outside a repository or without git."""
    def run(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True,
                              timeout=20).stdout.strip()
    try:
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
