"""Which local user owns the other end of a loopback TCP connection.

Unix sockets have ``SO_PEERCRED``; TCP has nothing like it. On Linux the kernel's socket
tables (``/proc/net/tcp`` and ``/proc/net/tcp6``) list every socket with its owner's uid,
so the peer of a loopback connection is the row whose local address is the peer's and whose
remote address is ours. A token-less hub uses this to accept only its own user's agents:
without it, any local user could register as a declared agent and receive its commands.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def _hex_address(host: str, port: int, width: int) -> str:
    """An address as the kernel prints it: each 32-bit word in host byte order, then the port."""
    ip = ipaddress.ip_address(host)
    packed = ip.packed
    if width == 16 and ip.version == 4:  # an IPv4 peer seen through an IPv6 socket
        packed = ipaddress.IPv6Address(f"::ffff:{ip}").packed
    words = [packed[i : i + 4] for i in range(0, len(packed), 4)]
    text = "".join(f"{int.from_bytes(w, sys.byteorder):08X}" for w in words)
    return f"{text}:{port:04X}"


def loopback_peer_uid(peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The uid owning the socket at ``peer`` connected to ``local``; None when not found
    (not Linux, or the peer already went away)."""
    peer_host, peer_port = peer[0], peer[1]
    local_host, local_port = local[0], local[1]
    for table, width in zip(_TABLES, (4, 16), strict=True):
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        try:
            want_local = _hex_address(peer_host, peer_port, width)
            want_remote = _hex_address(local_host, local_port, width)
        except ValueError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 7 and fields[1] == want_local and fields[2] == want_remote:
                return int(fields[7])
    return None
