"""Hub names without a network: one line at once, not a minute of retries.

`from_pretrained("gpt2")` on a machine that cannot reach the hub retries for about 25-50 s before
it fails (huggingface_hub's backoff). A name that is neither a local folder nor in the local cache
is checked first: offline mode, or the hub's host not reachable within a few seconds, is one line
saying what to do instead."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from engine.errors import EngineError

PROBE_TIMEOUT_S = 3.0
_reachable: dict[str, bool] = {}  # per endpoint, per process: one probe


def looks_like_hub_id(name: str) -> bool:
    return not Path(name).expanduser().exists() and not name.startswith((".", "/", "~")) and name.count("/") <= 1


def check_hub_name(name: str, what: str) -> None:
    """`what` names where the user gave it (model.name_or_path=gpt2, tokenizer=..., the generate argument)."""
    if not looks_like_hub_id(name) or in_local_cache(name):
        return
    import huggingface_hub.constants as hub
    if hub.HF_HUB_OFFLINE:
        reason, extra = "the hub is switched off (HF_HUB_OFFLINE=1)", ""
    elif not _endpoint_reachable(hub.ENDPOINT):
        reason, extra = f"{hub.ENDPOINT} cannot be reached (no network?)", ", or set HF_ENDPOINT to a mirror"
    else:
        return
    raise EngineError(f"{what}: {name!r} is a hub name that is not in the local cache, and {reason}: give a "
                      f"local folder instead (one saved with save_pretrained or snapshot_download){extra}")


def in_local_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return any(isinstance(try_to_load_from_cache(name, f), str) for f in ("config.json", "tokenizer_config.json"))
    except Exception:  # an invalid repo id: let from_pretrained say what is wrong with it
        return True


def _endpoint_reachable(endpoint: str) -> bool:
    if endpoint not in _reachable:
        url = urlparse(endpoint)
        if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
            _reachable[endpoint] = True  # through a proxy only the request itself can tell
        else:
            try:
                socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                         timeout=PROBE_TIMEOUT_S).close()
                _reachable[endpoint] = True
            except OSError:
                _reachable[endpoint] = False
    return _reachable[endpoint]
