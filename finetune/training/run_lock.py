"""One run per output folder at a time: an OS lock on `<output_dir>/.lock`, held by the main process from before
anything is written until the process exits.

The kernel drops an flock when its holder dies, so a crash or kill -9 never leaves a stale lock: the next run (a
requeued job's `--resume auto`) takes it at once. A second run on a held folder stops before building anything and
says who holds it; `--wait-for-lock SECONDS` waits for the holder to finish first (the default with `--resume auto`).

Filesystems without flock (some network mounts) get a heartbeat lock instead: `.lock` created exclusively with the
holder's host and PID, its time refreshed every HEARTBEAT_S by a thread; one whose heartbeat is older than STALE_S,
or whose holder is a dead PID on this host, is taken over.

Readers of a running folder (merge, eval, predict) resolve `checkpoints/last` to one step folder and hold a shared
lock on `<output_dir>/.read.lock` while they load it; pruning skips old checkpoints while any reader holds it, so a
reader never sees a checkpoint deleted or replaced under it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from finetune.config import ConfigError

LOCK_FILE = ".lock"
READ_LOCK_FILE = ".read.lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
log = logging.getLogger(__name__)


class RunLock:
    """The exclusive hold of one output folder (re-entrant within a process: the demo holds it around its runs)."""

    _held: dict[Path, RunLock] = {}  # folder -> this process's lock on it

    def __init__(self, folder: Path, fd: int | None, heartbeat: threading.Event | None):
        self.folder, self.fd, self._stop_heartbeat, self.depth = folder, fd, heartbeat, 1
        self.created_folder = False  # made by acquire(): removed again if the run leaves nothing else in it

    @classmethod
    def acquire(cls, folder: str | Path, wait_s: float = 0.0, poll_s: float = 1.0) -> RunLock:
        """Hold `folder` (created if missing), waiting up to `wait_s` seconds for another run to release it; raise a
        ConfigError naming the holder when it is still held."""
        folder = Path(folder).resolve()
        if folder in cls._held:
            cls._held[folder].depth += 1
            return cls._held[folder]
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + max(wait_s, 0.0)
        said = False
        while True:
            lock = cls._try(folder)
            if lock is not None:
                lock.created_folder = created
                cls._held[folder] = lock
                return lock
            if time.monotonic() >= deadline:
                raise ConfigError(held_message(folder, wait_s))
            if not said:
                holder = read_holder(folder)
                log.info(f"waiting up to {wait_s:.0f} s for the run holding {folder} (process {holder.get('pid')} "
                         f"on {holder.get('host')}) to finish")
                said = True
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.01)))

    @classmethod
    def _try(cls, folder: Path) -> RunLock | None:
        path = folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as err:
            os.close(fd)
            if err.errno not in NO_FLOCK:
                raise
            return cls._try_heartbeat(folder)
        holder = read_holder(folder)  # a live holder on a host whose mount lacks flock still counts
        if holder.get("locking") == "heartbeat" and not _stale(folder / LOCK_FILE, holder):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            return None
        _write_holder(fd, locking="flock")
        return cls(folder, fd, None)

    @classmethod
    def _try_heartbeat(cls, folder: Path) -> RunLock | None:
        """No flock here: a lock file whose holder proves it is alive by touching it."""
        path = folder / LOCK_FILE
        holder = read_holder(folder)
        if holder.get("locking") == "heartbeat" and not _stale(path, holder):
            return None
        tmp = folder / f".lock.{socket.gethostname()}.{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        _write_holder(fd, locking="heartbeat")
        os.replace(tmp, path)  # a stale or flock-style file is replaced whole
        now = read_holder(folder)
        if (now.get("host"), now.get("pid")) != (socket.gethostname(), os.getpid()):  # another run won the race
            os.close(fd)
            return None
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):
                    os.utime(path)

        threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True).start()
        log.warning(f"note: {folder} is on a filesystem without file locks; holding it with a heartbeat file instead "
                    f"(a run whose heartbeat stopped {STALE_S:.0f} s ago is taken over)")
        return cls(folder, fd, stop)

    def release(self) -> None:
        self.depth -= 1
        if self.depth > 0:
            return
        RunLock._held.pop(self.folder, None)
        if self._stop_heartbeat is not None:
            self._stop_heartbeat.set()
            with contextlib.suppress(OSError):
                (self.folder / LOCK_FILE).unlink()
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        if self.created_folder and {p.name for p in self.folder.iterdir()} <= {LOCK_FILE, READ_LOCK_FILE}:
            with contextlib.suppress(OSError):  # a run refused before writing anything leaves no folder behind
                for name in (LOCK_FILE, READ_LOCK_FILE):
                    (self.folder / name).unlink(missing_ok=True)
                self.folder.rmdir()


def _write_holder(fd: int, locking: str) -> None:
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "locking": locking}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(fd)


def read_holder(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def _stale(path: Path, holder: dict) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True  # its holder died on this machine
        except PermissionError:
            pass
    return age > STALE_S


def held_message(folder: Path, wait_s: float) -> str:
    holder = read_holder(folder)
    who = (f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}" if holder else
           "another process")
    waited = f" (waited {wait_s:.0f} s)" if wait_s > 0 else ""
    return (f"--output-dir {folder} is in use by another run: {who}{waited}. Wait for it to finish (or pass "
            "--wait-for-lock SECONDS to wait), or use another --output-dir")


@contextlib.contextmanager
def reading_checkpoint(checkpoint: str | Path) -> Iterator[Path]:
    """A checkpoint folder to read while its run may still be training: `last` (or any link) resolved to one step
    folder, and a shared lock that keeps the run's pruning from deleting it until the block ends."""
    folder = Path(checkpoint).resolve()
    if not folder.exists() and (folder.parent / f".old-{folder.name}").is_dir():  # a re-save cut short by a crash
        folder = folder.parent / f".old-{folder.name}"
    lock_path = folder.parent.parent / READ_LOCK_FILE
    fd = None
    if folder.parent.name == "checkpoints":
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:  # read-only copy or no flock: nothing is pruning it, or nothing can be done
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield folder
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextlib.contextmanager
def pruning_allowed(checkpoints_dir: Path) -> Iterator[bool]:
    """True while no reader holds the run's read lock (and none can start); False: prune later."""
    fd = None
    try:
        fd = os.open(checkpoints_dir.parent / READ_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    except OSError:  # no flock on this filesystem: prune as before
        if fd is not None:
            os.close(fd)
        yield True
        return
    try:
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
