"""Free TCP ports for the servers and services we start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Below the kernel's ephemeral range (32768 by default) and above `pflea up`'s fixed ports.
LOWEST = 20000
_chosen = random.SystemRandom()
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nothing uses now, for a server about to start, never the same one twice.

    Chosen below the ephemeral range: a port from it (what binding port 0 gives) can be taken by
    any outgoing connection before the server binds it, and a pipeline under test makes many.
    """
    low = _ephemeral_low()
    if low > LOWEST + 1000:
        for _ in range(200):
            port = _chosen.randrange(LOWEST, low)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    with socket.socket() as s:  # an unusual ephemeral range, or a crowded one: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
