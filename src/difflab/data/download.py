"""Fetching standard data files, only where the network allows, verified by checksum.

Nothing here runs unless a data set is missing from disk. ``DIFFLAB_OFFLINE=1`` turns
downloading off entirely (the tests set it); otherwise one short TCP probe decides whether to try.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path

from difflab.errors import DataError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0  # one TCP connect; a sandbox without network fails in milliseconds
READ_TIMEOUT_S = 30.0
_BLOCK = 1 << 20


def data_home() -> Path:
    """Where downloads go: ``$DIFFLAB_DATA`` if set, else ``~/.cache/difflab``."""
    env = os.environ.get("DIFFLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "difflab"


def network_available(url: str) -> bool:
    """True when downloading is allowed and the host of ``url`` accepts a TCP connection."""
    if os.environ.get("DIFFLAB_OFFLINE", "") not in ("", "0"):
        return False
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return True
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str) -> Path:
    """Fetch ``url`` to ``dest`` atomically (``.part`` then rename) and check its MD5.

    The MD5s are the published ones (also used by torchvision); a mismatch deletes the file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    log.info("downloading %s -> %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=READ_TIMEOUT_S) as r, part.open("wb") as f:
            while block := r.read(_BLOCK):
                f.write(block)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise DataError(f"{url}: download failed ({' '.join(str(e).split())})") from None
    got = md5_file(part)
    if got != md5:
        part.unlink(missing_ok=True)
        raise DataError(f"{url}: downloaded file has MD5 {got}, expected {md5}; not kept")
    part.replace(dest)
    return dest
