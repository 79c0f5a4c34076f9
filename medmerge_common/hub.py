"""Is the Hugging Face hub reachable? One quick TCP connect, so an offline machine fails in seconds instead of
sitting through huggingface_hub's retries. And where a model reference is on this machine without the hub."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

# A merge or an evaluation asks many times in a few seconds; a notebook that lives for hours must see the
# network come and go, so an answer is kept this long and no longer.
PROBE_TTL_S = 60.0
_last_probe: tuple[float, str, bool] | None = None  # (monotonic time, endpoint, reachable)


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub endpoint accepts a TCP connection; False also when HF_HUB_OFFLINE is set."""
    global _last_probe
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    now, endpoint = time.monotonic(), constants.ENDPOINT
    if _last_probe is not None and _last_probe[1] == endpoint and now - _last_probe[0] < PROBE_TTL_S:
        return _last_probe[2]
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        reachable = True
    except OSError:
        reachable = False
    _last_probe = (now, endpoint, reachable)
    return reachable


def split_ref(ref: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev')."""
    repo, _, revision = ref.partition("@")
    return repo, revision or None


def local_dir(ref: str) -> Path | None:
    """The local directory for `ref` (a path, or its copy under $MEDMERGE_MODEL_DIR), if there is one."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    mirror = os.environ.get("MEDMERGE_MODEL_DIR")
    if mirror:
        candidate = Path(mirror) / split_ref(ref)[0]
        if candidate.is_dir():
            return candidate
    return None
