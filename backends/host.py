"""Facts about this machine and process that the engine, the launchers and the benchmarks all ask
for: GPUs present, peak and current memory, a free TCP port. One reader for each."""
from __future__ import annotations

import os
import resource
import socket
from pathlib import Path

import torch


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (host "" = every interface, for a rank on a remote node)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def current_rss_mb() -> float | None:
    """This process's resident memory now (Linux /proc); None where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak memory in MiB: host RSS always, accelerator allocated/reserved on CUDA."""
    stats = {"host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        stats["gpu_alloc_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        stats["gpu_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return stats


STALE_LOCK_S = 600  # no JIT build of an op takes this long here (cpu_adam ~40 s on 2 cores)


def stale_build_locks(now: float | None = None) -> list[str]:
    """Warnings for torch extension build locks older than STALE_LOCK_S. A build that was killed
    leaves `<op>/lock` in TORCH_EXTENSIONS_DIR, and the next process that needs the op waits on it
    forever, printing nothing; the lock is not removed here (a build may really be running)."""
    import time
    # torch's own default root holds one folder per Python/CUDA build (py311_cpu/<op>), hence two levels
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    now = time.time() if now is None else now
    notes = []
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = now - lock.stat().st_mtime
        except OSError:
            continue
        if age > STALE_LOCK_S:
            notes.append(f"warning: {lock} is {age / 60:.0f} minutes old: a JIT build that was killed leaves it, "
                         f"and every later run that needs the {lock.parent.name} op waits on it forever; remove "
                         "it if no build is running")
    return notes
