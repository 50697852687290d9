import multiprocessing.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests never reach the hub (CI has no network): fail fast instead of retrying connections
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import SHARED_DATA, run_many, tiny_gpt2_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set ENGINE_SHARED_DATA)")
    return tiny_gpt2_dir(tmp_path_factory.mktemp("models"))


# ------------------------------------------------------------------------------------------------
# One shared 2-process training job per test session. Starting a job costs 15-20 s here (every
# process imports torch, transformers and the backends' libraries), a tiny scenario 1-3 s, so the
# 2-process scenarios of every selected module run in ONE torchrun job (tests/drivers/run_many.py):
# a module declares them in `shared_scenarios(root, model) -> [resolved config dicts]` (each with
# its own output_dir under root) and reads the results through this fixture.
# ------------------------------------------------------------------------------------------------
@dataclass
class SharedJob:
    roots: dict          # module name -> its folder (its scenarios' output_dirs are under it)
    log: str             # the job's stdout + stderr (run_many marks each scenario's lines)
    seconds: float
    scenarios: int

    def root(self, module: str) -> Path:
        return self.roots[module]


@pytest.fixture(scope="session")
def shared_job(request, tiny_gpt2, tmp_path_factory) -> SharedJob:
    modules = {item.module.__name__: item.module for item in request.session.items
               if hasattr(item.module, "shared_scenarios")}
    top = tmp_path_factory.mktemp("shared")
    roots, scenarios = {}, []
    for name in sorted(modules):
        roots[name] = top / name
        scenarios += modules[name].shared_scenarios(roots[name], tiny_gpt2)
    # DeepSpeed's backend must be the one that joins the process group (deepspeed.init_distributed);
    # the sort is stable, so each module's scenarios keep their order (stop, then resume)
    scenarios.sort(key=lambda c: (c.get("backend") or {}).get("name") != "deepspeed")
    started = time.perf_counter()
    proc = run_many(scenarios, top, timeout=2400)
    return SharedJob(roots, proc.stdout + proc.stderr, time.perf_counter() - started, len(scenarios))


# ------------------------------------------------------------------------------------------------
# The fast tier (`make test-fast`, `pytest -m fast`): tests marked `fast` run in this process only.
# While a fast test (and any fixture it sets up) runs, starting a process is an error, so a
# multi-process run cannot slip into the tier by being marked by mistake or by a fixture.
# ------------------------------------------------------------------------------------------------
class _NoProcesses:
    def __init__(self, item):
        self.item = item

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"{self.item.nodeid} is marked `fast` but starts a process; fast tests run "
                             f"in-process only: drop the mark (or move the process part to another test)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("fast") is None:
        yield
        return
    refuse = _NoProcesses(item)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "__init__", refuse)
        mp.setattr(os, "fork", refuse)
        mp.setattr(os, "posix_spawn", refuse)
        mp.setattr(os, "posix_spawnp", refuse)
        mp.setattr(multiprocessing.util, "spawnv_passfds", refuse)  # multiprocessing's spawn/forkserver
        yield


@pytest.fixture(scope="module")
def launch_reference(request, shared_job) -> list[float]:
    """Per-step losses of the launch tests' tiny job (tests/launching.py) uninterrupted, 2 processes:
    a scenario of the shared job (the module imports launching.shared_scenarios), which computes as a
    launch does (one thread per process, the same config), so the launch tests compare for equality."""
    from helpers import losses
    from launching import STEPS, reference_dir
    got = losses(reference_dir(shared_job.root(request.module.__name__)))
    assert len(got) == STEPS
    return got
