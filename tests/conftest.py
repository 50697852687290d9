import multiprocessing.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests never reach the hub (CI has no network): fail fast instead of retrying connections
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import SHARED_DATA, tiny_gpt2_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set ENGINE_SHARED_DATA)")
    return tiny_gpt2_dir(tmp_path_factory.mktemp("models"))


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
