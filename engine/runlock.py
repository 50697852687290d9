"""One run directory, one live job: `engine launch` holds OUTPUT_DIR/.engine.lock for the life of
the job, so a second launch on the same directory gets a one-line error naming the holder instead
of "resuming" a run that is still training (and writing into the same metrics.jsonl).

The lock is a file created with O_CREAT|O_EXCL (atomic on local disks and on NFS v3+, unlike
fcntl/flock, which many shared filesystems do not honour) holding who took it, and a heartbeat:
its holder touches it every HEARTBEAT_S seconds. A lock left by a crashed or killed job does not
block a relaunch: on the holder's own host a dead pid frees it at once; from another host a
heartbeat older than STALE_AFTER_S frees it. Taking over a stale lock is said in one log line.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from engine.errors import EngineError
from engine.metrics import log

LOCK_FILE = ".engine.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


class RunLock:
    def __init__(self, output_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.path = Path(output_dir) / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_dir = False

    def acquire(self) -> "RunLock":
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True)
            self._made_dir = True
        for _ in range(3):  # a stale lock removed by us, or by a relaunch racing with us
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                reason = self._stale_reason(holder)
                if reason is None:
                    self._give_up_dir()
                    raise EngineError(f"output_dir {self.path.parent} is in use by another job (host "
                                      f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
                                      f"{holder.get('started', '?')}); wait for it to end or stop it "
                                      f"(its lock: {self.path})") from None
                log(f"taking over the lock of a job that is gone ({reason}): {self.path}")
                self.path.unlink(missing_ok=True)
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.me, f)
            except OSError as e:  # a full disk: nothing of ours is left behind
                self.path.unlink(missing_ok=True)
                self._give_up_dir()
                raise EngineError(f"cannot write the run lock {self.path}: {e.strerror}; free space there and "
                                  "relaunch") from None
            self._thread = threading.Thread(target=self._beat, name="engine-run-lock", daemon=True)
            self._thread.start()
            return self
        raise EngineError(f"could not take the lock {self.path} (another launch keeps taking it)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._holder() == self.me:
            self.path.unlink(missing_ok=True)
        self._give_up_dir()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- internals ---------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale_reason(self, holder: dict) -> str | None:
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"]):
                return f"pid {holder['pid']} on this host has ended"
            return None
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "its lock vanished"
        if age > self.stale_after_s:
            return f"no heartbeat from {holder.get('host', '?')} for {age:.0f} s"
        return None

    def _give_up_dir(self) -> None:
        """A directory this launch created and left empty goes again: a failed launch writes nothing."""
        if self._made_dir:
            try:
                self.path.parent.rmdir()
            except OSError:
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
