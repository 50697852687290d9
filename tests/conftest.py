import os
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
