"""The process actor: one per process in a container.

It owns the server's copies of the process's stdio fds. Its task pumps output to
every attached ``Subscription``; a second task of its own, the stdin writer, owns the
stdin pipe, so a write blocked on a full pipe (backpressure) never holds up a signal.
The writer is started by the actor's task when the first stdin command comes (most
processes never get one: a task less per ``run``).
Output is never dropped for an attached client: a subscription takes a chunk only when
its client is ready for it, and until then the pump stops reading, so the pipe fills and
the process blocks. A subscription ends only after all output, so the exit code goes out last.

Callers hold the ``ProcessActor`` itself as the handle: its public coroutines send
commands to its mailboxes; ``exit_code``, ``done`` and ``running`` are what the actor
publishes for readers. The owning container actor reports the exit (``exited``) or the
loss of the shim (``lost``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
from dataclasses import dataclass

import trio

from ..errors import GardenError
from ..ops import logs
from .mailbox import ActorGone, Mailbox, Request
from .shim_link import ShimLink

log = logging.getLogger("gactor.process")

# Output memory per stream (docs/limits.md, "Server memory per open stream"): each pump holds at
# most one chunk it has read but no subscriber has taken yet; a subscription queues none
# (a rendezvous), so a slow subscriber stops the pump, the pipe fills and the process
# blocks. Chunks this large keep the per-read and per-frame costs low (throughput).
READ_CHUNK = 256 << 10
SUBSCRIBER_QUEUE = 0
# After the exit code arrives, keep reading until EOF, but stop once the pipe has been
# idle this long (a daemonised grandchild may hold it open forever). Time spent waiting
# for a slow subscriber does not count: everything already written is delivered.
EXIT_DRAIN_GRACE = 1.0
STDIN_QUEUE = 4  # writes queued for the stdin writer before senders wait


class Subscription:
    """One client's view of a process: output from the moment it attached, then the end."""

    def __init__(self, stdout: bool, stderr: bool) -> None:
        self.fds = {fd for fd, wanted in ((1, stdout), (2, stderr)) if wanted}
        self._send: trio.MemorySendChannel[tuple[int, bytes]]
        self.receive: trio.MemoryReceiveChannel[tuple[int, bytes]]
        self._send, self.receive = trio.open_memory_channel(SUBSCRIBER_QUEUE)

    async def deliver(self, fd: int, data: bytes) -> bool:
        """Hand over a chunk, waiting until the subscriber takes it; False once it went away."""
        try:
            await self._send.send((fd, data))
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False

    def end(self) -> None:
        self._send.close()


# ---- commands ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Subscribe:
    sub: Subscription


@dataclass(frozen=True)
class _Unsubscribe:
    sub: Subscription


@dataclass(frozen=True)
class _Signal:
    signum: int


@dataclass(frozen=True)
class _Resize:
    columns: int
    rows: int


@dataclass(frozen=True)
class _StartStdinWriter:
    pass


@dataclass(frozen=True)
class _Exited:
    code: int


@dataclass(frozen=True)
class _Lost:
    reason: str


@dataclass(frozen=True)
class _Write:
    data: bytes


@dataclass(frozen=True)
class _CloseStdin:
    pass


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
        self.lost_reason = ""  # set when the shim died: the exit code can never be known
        self._exited = trio.Event()
        if exit_code is not None:
            self._exited.set()
        self.done = trio.Event()
        self._subs: set[Subscription] = {subscriber} if subscriber is not None else set()
        self._pump_scopes: list[trio.CancelScope] = []
        self._reads: set[trio.CancelScope] = set()  # the pumps' waits for output
        self._pumping = 0  # pumps not at EOF yet
        self._mailbox = Mailbox(f"process {id}")
        # The stdin writer's mailbox: made (by the actor's task only) when the writer is
        # started; the handle's side reads it to skip asking for that again.
        self._stdin_box: Mailbox | None = None
        self._nursery: trio.Nursery | None = None  # the actor's own, for the stdin writer

    @property
    def running(self) -> bool:
        return self.exit_code is None and not self.lost_reason

    async def run(self, *, task_status: trio.TaskStatus[ProcessActor] = trio.TASK_STATUS_IGNORED) -> None:
        """Pump output until exit and EOF, then end every subscription and release the
        fds (here and in the shim). Commands sent after that are answered from what the
        actor published (see the public methods)."""
        logs.tag_task(process_id=self.id)  # this task is the actor's alone
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for fd, stream in ((1, self._stdout), (2, self._stderr)):
                    if stream is not None:
                        scope = trio.CancelScope()
                        self._pump_scopes.append(scope)
                        self._pumping += 1
                        nursery.start_soon(self._pump, stream, fd, scope)
                task_status.started(self)
                self._end_if_finished()  # no pumps and the exit code known from the start
                # This task serves the mailbox until the exit has come and every pump has
                # reached EOF (whichever is last stops the serving: ``_end_if_finished``).
                await self._mailbox.serve(self._handle)
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._mailbox.close()
            if self._stdin_box is not None:
                self._stdin_box.close()
            for sub in self._subs:
                sub.end()
            self._subs.clear()
            if self.exit_code is None and not self.lost_reason:
                self.exit_code = 137  # only reached when the container is torn down under us
            self.done.set()
            for stream in self._streams:
                stream.close()
            # An exited process stays listed (KEEP_EXITED of them): keep no more of it than
            # its published state, so the objects each leaves for the garbage collector's
            # full collections stay few.
            self._streams = []
            self._stdin = self._stdout = self._stderr = None
            self._pump_scopes.clear()
            self._reads.clear()
            if not self.lost_reason:  # one scope: shielded, with its own 5 s bound
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                    try:
                        await self._link.request("drained", id=self.id)
                    except GardenError as err:
                        log.debug("process %s: releasing its fds in the shim: %s", self.id, err)

    async def _handle(self, request: Request[None]) -> None:
        match request.command:
            case _StartStdinWriter():
                if self._stdin_box is None and self._nursery is not None:
                    # The stdin pipe's owner: writes in order, each finished before its reply.
                    self._stdin_box = Mailbox(f"the stdin of process {self.id}", STDIN_QUEUE)
                    self._nursery.start_soon(self._stdin_box.serve, self._stdin_command)
            case _Subscribe(sub):
                self._subs.add(sub)
            case _Unsubscribe(sub):
                self._subs.discard(sub)
                sub.receive.close()
            case _Signal(signum):
                await self._link.request("signal", id=self.id, signal=signum)
            case _Resize(columns, rows):
                await self._link.request("resize", id=self.id, columns=columns, rows=rows)
            case _Exited(code):
                if self.exit_code is None:
                    self.exit_code = code
                self._set_exited()
            case _Lost(reason):
                self.lost_reason = reason
                self._set_exited()
                for scope in self._pump_scopes:
                    scope.cancel()

    def _set_exited(self) -> None:
        self._exited.set()
        self._push_drain_deadline()
        self._end_if_finished()

    def _end_if_finished(self) -> None:
        if self._exited.is_set() and not self._pumping:
            self._mailbox.stop_serving()

    def _push_drain_deadline(self) -> None:
        """The exit came: a pump waiting for output now gives up after EXIT_DRAIN_GRACE."""
        deadline = trio.current_time() + EXIT_DRAIN_GRACE
        for scope in self._reads:
            scope.deadline = deadline

    async def _pump(self, stream: trio.lowlevel.FdStream, fd: int, scope: trio.CancelScope) -> None:
        """Read ``fd`` and hand each chunk to every subscriber, waiting until each has
        taken it (so a slow one pauses the process). After the exit, only time spent waiting for the
        process to write counts towards EXIT_DRAIN_GRACE, never time spent waiting for a
        slow subscriber: that would drop output still in the pipe."""
        try:
            with scope:  # cancelled when the shim is lost
                await self._pump_until_eof(stream, fd)
        finally:
            self._pumping -= 1
            self._end_if_finished()

    async def _pump_until_eof(self, stream: trio.lowlevel.FdStream, fd: int) -> None:
        while True:
            data = b""
            with trio.CancelScope() as reading:
                if self._exited.is_set():
                    reading.deadline = trio.current_time() + EXIT_DRAIN_GRACE
                self._reads.add(reading)
                try:
                    data = await stream.receive_some(READ_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return  # EIO on a pty master is its normal end of stream
                finally:
                    self._reads.discard(reading)
            if not data:
                return  # EOF, or idle past the grace after the exit
            for sub in list(self._subs):
                if fd in sub.fds and not await sub.deliver(fd, data):
                    self._subs.discard(sub)

    async def _stdin_command(self, request: Request[None]) -> None:
        command = request.command
        if isinstance(command, _Write):
            if self._stdin is None:
                return  # closed or gone: Garden drops stdin written after that
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._stdin.send_all(command.data)
            return
        if self.tty:
            if self._stdin is not None and self.running:
                with contextlib.suppress(trio.BrokenResourceError, OSError):
                    await self._stdin.send_all(b"\x04")  # EOF for the terminal's line discipline
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

    # ---- the handle's side -------------------------------------------------------------

    async def _ask(self, mailbox: Mailbox, command: object) -> None:
        """Commands to a finished process are no-ops, as in Garden."""
        if self.done.is_set():
            return
        with contextlib.suppress(ActorGone):
            await mailbox.ask(command)

    async def subscribe(self, sub: Subscription) -> None:
        """Deliver output from now on to ``sub``; if the process has finished, end it at once."""
        if not self.done.is_set():
            try:
                await self._mailbox.ask(_Subscribe(sub))
                return
            except ActorGone:
                pass  # it finished meanwhile
        sub.end()

    async def unsubscribe(self, sub: Subscription) -> None:
        if self.done.is_set():
            sub.receive.close()
            return
        await self._ask(self._mailbox, _Unsubscribe(sub))
        sub.receive.close()

    async def wait(self) -> int:
        """The exit code, once all output has been delivered. Raises GardenError when the
        shim died and the exit code is lost. Cancelled: nothing changes."""
        await self.done.wait()
        if self.exit_code is None:
            raise GardenError(f"process {self.id}: {self.lost_reason}")
        return self.exit_code

    async def write_stdin(self, data: bytes) -> None:
        """Write to the process's stdin, returning once written (backpressure); dropped
        once stdin is closed or the process is gone. Cancelled: the write may still happen."""
        await self._to_stdin_writer(_Write(data))

    async def close_stdin(self) -> None:
        await self._to_stdin_writer(_CloseStdin())

    async def _to_stdin_writer(self, command: _Write | _CloseStdin) -> None:
        """Ask the stdin writer, having the actor start it first if it has not (none
        once the actor has ended: the command is then dropped, as for a finished process)."""
        if self._stdin_box is None:
            await self._ask(self._mailbox, _StartStdinWriter())
        if self._stdin_box is not None:
            await self._ask(self._stdin_box, command)

    async def signal(self, signum: int) -> None:
        await self._ask(self._mailbox, _Signal(signum))

    async def resize(self, columns: int, rows: int) -> None:
        await self._ask(self._mailbox, _Resize(columns, rows))

    # ---- from the owning container actor ---------------------------------------------------

    async def exited(self, code: int) -> None:
        await self._mailbox.tell(_Exited(code))

    async def lost(self, reason: str) -> None:
        await self._mailbox.tell(_Lost(reason))
