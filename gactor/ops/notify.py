"""systemd's readiness protocol (sd_notify): datagrams to ``$NOTIFY_SOCKET``.

The unit (contrib/gactor.service) is ``Type=notify``: systemd counts the service as
started when ``READY=1`` arrives, which the server sends once startup reconcile is
done and the API listens. ``ServiceManager.from_environment`` takes the socket out of
the environment before the server forks anything, so no spawner, shim or container
process inherits it. Without ``$NOTIFY_SOCKET`` (not run by systemd) ``notify`` does
nothing, so ``gactor server`` runs the same anywhere.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("gactor.ops.notify")


class ServiceManager:
    """Where to send notifications; ``path`` None (or empty) means nobody listens."""

    def __init__(self, path: str | None) -> None:
        self.path = path or None

    @classmethod
    def from_environment(cls) -> ServiceManager:
        """The manager named by ``$NOTIFY_SOCKET``, removed from this process's environment."""
        return cls(os.environ.pop("NOTIFY_SOCKET", None))

    def notify(self, *assignments: str) -> bool:
        """Send ``READY=1``, ``STOPPING=1``, ``STATUS=...`` (one datagram, one per line);
        False when nobody listens. A failure to send is logged, never raised: the server
        runs on without the notification."""
        if self.path is None:
            return False
        if self.path.startswith("@"):
            address = "\0" + self.path[1:]  # an abstract socket
        elif self.path.startswith("/"):
            address = self.path
        else:
            log.warning(
                "ignoring NOTIFY_SOCKET=%r: neither an absolute path nor an abstract socket",
                self.path,
            )
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall("\n".join(assignments).encode())
        except OSError as err:
            log.warning("cannot notify the service manager (%s): %s", " ".join(assignments), err)
            return False
        return True
