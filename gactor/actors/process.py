"""The process actor: one per process in a container.

It owns the server's copies of the process's stdio fds, pumps output to every
attached ``Subscription`` and learns the exit code from the shim. Output is never
dropped for an attached client: each subscription has a small bounded queue, and
when one is full the pump stops reading, so the pipe fills and the process
blocks (backpressure), keeping server memory bounded. The end of a subscription
(its queue closing) comes only after all output, so the exit code goes out last.
"""

from __future__ import annotations

import errno
import logging

import trio

from ..errors import GardenError
from .shim_link import ShimLink

log = logging.getLogger("gactor.process")

READ_CHUNK = 1 << 20
SUBSCRIBER_QUEUE = 2  # chunks; with READ_CHUNK this bounds memory per attached client
# After the exit code arrives, keep reading until EOF, but stop once output has been
# idle this long: a daemonised grandchild may hold the pipe open forever.
EXIT_DRAIN_GRACE = 1.0


class Subscription:
    """One client's view of a process: output from the moment it attached, then the end."""

    def __init__(self, stdout: bool, stderr: bool) -> None:
        self.fds = {fd for fd, wanted in ((1, stdout), (2, stderr)) if wanted}
        self._send, self.receive = trio.open_memory_channel[tuple[int, bytes]](SUBSCRIBER_QUEUE)

    async def deliver(self, fd: int, data: bytes) -> bool:
        """Queue a chunk, waiting for room; False once the subscriber went away."""
        try:
            await self._send.send((fd, data))
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False

    def end(self) -> None:
        self._send.close()


class ProcessActor:
    def __init__(self, id: str, pid: int, tty: bool, fds: list[int], link: ShimLink,
                 exit_code: int | None = None, stdin_open: bool = True,
                 subscriber: Subscription | None = None) -> None:
        self.id = id
        self.pid = pid
        self.tty = tty
        self._link = link
        streams = [trio.lowlevel.FdStream(fd) for fd in fds]
        if tty:
            self._stdin = self._stdout = streams[0] if streams else None
            self._stderr = None
        else:
            self._stdin, self._stdout, self._stderr = (streams + [None, None, None])[:3]
        if not stdin_open and self._stdin is not None and not tty:
            self._stdin = None
        self._streams = streams
        self.exit_code = exit_code
        self._exited = trio.Event()
        if exit_code is not None:
            self._exited.set()
        self.done = trio.Event()
        self._subs: set[Subscription] = {subscriber} if subscriber is not None else set()
        self._stdin_lock = trio.Lock()
        self._pump_scopes: list[trio.CancelScope] = []

    @property
    def running(self) -> bool:
        return self.exit_code is None

    async def run(self, *, task_status: trio.TaskStatus[ProcessActor] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for fd, stream in ((1, self._stdout), (2, self._stderr)):
                    if stream is not None:
                        scope = trio.CancelScope()
                        self._pump_scopes.append(scope)
                        nursery.start_soon(self._pump, stream, fd, scope)
                task_status.started(self)
                await self._exited.wait()
                self._push_drain_deadline()
        finally:
            for sub in self._subs:
                sub.end()
            self._subs.clear()
            if self.exit_code is None:
                self.exit_code = 137  # only reached when the container is torn down under us
            self.done.set()
            for stream in self._streams:
                stream.close()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await self._link.request("drained", id=self.id)
                except GardenError as err:
                    log.debug("process %s: releasing its fds in the shim: %s", self.id, err)

    def _push_drain_deadline(self) -> None:
        deadline = trio.current_time() + EXIT_DRAIN_GRACE
        for scope in self._pump_scopes:
            scope.deadline = deadline

    async def _pump(self, stream: trio.lowlevel.FdStream, fd: int, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    data = await stream.receive_some(READ_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return  # EIO on a pty master is its normal end of stream
                if not data:
                    return
                if self._exited.is_set():
                    self._push_drain_deadline()
                for sub in list(self._subs):
                    if fd in sub.fds and not await sub.deliver(fd, data):
                        self._subs.discard(sub)

    def set_exit(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
        self._exited.set()

    def add_subscriber(self, sub: Subscription) -> None:
        """Deliver output from now on to ``sub``; if the process has finished, end it at once."""
        if self.done.is_set():
            sub.end()
        else:
            self._subs.add(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        sub.receive.close()

    async def wait(self) -> int:
        await self.done.wait()
        assert self.exit_code is not None
        return self.exit_code

    async def write_stdin(self, data: bytes) -> None:
        """Write to the process's stdin; silently dropped once stdin is closed or the process is gone."""
        async with self._stdin_lock:
            if self._stdin is None:
                return
            try:
                await self._stdin.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def close_stdin(self) -> None:
        async with self._stdin_lock:
            if self.tty:
                if self._stdin is not None and self.running:
                    try:
                        await self._stdin.send_all(b"\x04")  # EOF for the terminal's line discipline
                    except (trio.BrokenResourceError, OSError):
                        pass
                return
            if self._stdin is None:
                return
            try:
                await self._stdin.aclose()
            except OSError as err:
                if err.errno != errno.EBADF:
                    raise
            self._stdin = None
        await self._link.request("close_stdin", id=self.id)

    async def signal(self, signum: int) -> None:
        await self._link.request("signal", id=self.id, signal=signum)

    async def resize(self, columns: int, rows: int) -> None:
        await self._link.request("resize", id=self.id, columns=columns, rows=rows)

