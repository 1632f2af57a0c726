"""Reaching the model hubs for pretrained weights: is the download cached already, can its host
be reached at all, and a note before a download, so that a command never waits in silence
(huggingface_hub retries an unreachable hub for up to a minute before it fails)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from tome.tools.errors import UserError

__all__ = ["Log", "cached_file", "hub_endpoint", "need_download", "offline", "quiet_hub", "reachable"]

Log = Callable[[str], None]
PROBE_SECONDS = 3.0
_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` or ``TOME_OFFLINE`` set (to anything but 0): never try a download."""
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "TOME_OFFLINE"))


def quiet_hub() -> None:
    """Failed hub requests are reported by our one-line error; silence the hub's own log."""
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass


def hub_endpoint() -> str:
    """The Hugging Face hub this machine uses (``HF_ENDPOINT``, else huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds (name lookup
    included). True when a proxy is configured: a direct connection says nothing then."""
    if any(os.environ.get(v) for v in _PROXIES):
        return True
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return True
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a stuck name lookup cannot hold us
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def need_download(spec: str, what: str, url: str, log: Log | None, hint: str) -> None:
    """Before downloading ``what`` of ``spec`` from ``url``: a note through ``log``, or at once a
    :class:`UserError` when the host cannot be reached (``hint`` says what to do instead)."""
    host = urlparse(url).hostname or url
    if not reachable(url):
        raise UserError(
            f"{spec}: no cached copy of {what} here, and {host} cannot be reached (offline?); {hint}"
        )
    if log is not None:
        log(f"tome: {spec}: downloading {what} from {host} (first use; cached afterwards)")


def cached_file(path: object) -> bool:
    """Whether ``path`` (e.g. what ``huggingface_hub.try_to_load_from_cache`` returns) is a file."""
    return path is not None and isinstance(path, str | Path) and Path(path).is_file()
