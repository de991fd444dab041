"""Where a gRPC address points: the one test, shared by the daemon and the client, of traffic that stays local."""

from __future__ import annotations

import ipaddress


def is_loopback(address: str) -> bool:
    """A loopback HOST:PORT or a Unix socket: traffic that never crosses a network."""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
