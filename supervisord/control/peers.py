"""Who is at the other end of a control connection, and whether they may use the daemon."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from anyio.abc import ByteStream, SocketAttribute

from supervisord.host import procfs


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a control connection (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int

    @property
    def groups(self) -> set[int]:
        """Primary and supplementary groups (SO_PEERCRED carries only the primary one)."""
        return {self.gid, *procfs.supplementary_groups(self.pid)}


def peer_of(stream: ByteStream) -> Peer:
    raw: socket.socket = stream.extra(SocketAttribute.raw_socket)
    data = raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return Peer(pid=pid, uid=uid, gid=gid)


def allowed(peer: Peer, allowed_gids: frozenset[int] = frozenset()) -> bool:
    """The daemon's own user and root; members of ``[daemon] allowed_groups`` if any."""
    if peer.uid in (0, os.geteuid()):
        return True
    return bool(allowed_gids) and bool(peer.groups & allowed_gids)
