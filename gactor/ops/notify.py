"""systemd's readiness protocol (sd_notify): datagrams to ``$NOTIFY_SOCKET``.

The unit (contrib/gactor.service) is ``Type=notify``: systemd counts the service as
started when ``READY=1`` arrives, which the server sends once startup reconcile is
done and the API listens. Without ``$NOTIFY_SOCKET`` (not run by systemd) every call
is a no-op, so ``gactor server`` runs the same anywhere.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("gactor.ops.notify")


def notify(*assignments: str) -> bool:
    """Send ``READY=1``, ``STOPPING=1``, ``STATUS=...`` (one datagram, one per line) to
    the service manager; False when there is none. A failure to send is logged, never
    raised: the server runs on without the notification."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    elif not path.startswith("/"):
        log.warning("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor an abstract socket", path)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall("\n".join(assignments).encode())
    except OSError as err:
        log.warning("cannot notify the service manager (%s): %s", " ".join(assignments), err)
        return False
    return True
