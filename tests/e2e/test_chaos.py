"""Chaos: a seeded random schedule of concurrent calls from several clients, ``kill -9``
of the server or of one container's shim at a random moment, a restart, and then every
invariant checked through the API and from outside (issue 7, "How it is checked").

During the chaos phase ``WORKERS`` clients, each on its own connection, create
containers (random properties, memory and CPU limits), run processes whose exit code is
determined (short ``exit K``; long ``sleep N; exit K``; ``read x; exit $x`` fed ``K`` on
stdin at once or later), stream files in, change properties and limits and destroy
containers; one more client lists and bulk-infos all the while. The ``Model`` records
what the server acknowledged. A call in flight at the kill may or may not have taken
effect, so the model keeps every value it may have left behind (a set per property,
limit and file; "creating" and "destroying" containers may or may not exist).

Then, at a moment the seed picks, one of:

- the server gets SIGKILL; it is started again on the same depot;
- one acknowledged container's shim gets SIGKILL. The clients go on for a moment, and
  only calls on that container may fail: a dead shim must not break a connection or
  another container, and waits on its processes end with an error naming it. The
  container must then report state ``broken`` with the shim-died event, refuse ``run``
  naming the state, and end re-attached waits with an error naming it (docs/actors.md,
  "Lifecycles"). The server is then stopped (SIGKILL or SIGTERM, the seed decides) and
  started again: a container whose shim is gone cannot be re-adopted, so startup
  removes it completely (docs/actors.md, "Supervision"; ``Registry._readopt``).

After the restart: every acknowledged container is listed, nothing unknown is; each
listed one has its properties and limits (API and cgroup files), its streamed-in files
(read on the host through its rootfs mount), every acknowledged process re-attaches and
reports its exit code (a stdin-fed one gets its ``K`` through the new attach if it never
got it; one whose run was in flight may have seen its stdin end instead, as the client
ends the stdin of a run call that failed), and a new process runs. Then every container is destroyed and nothing may be
left: cgroups, mounts, container directories, shims, inits.

Seeds: ``GACTOR_CHAOS_SEEDS=N`` runs seeds 1..N (``GACTOR_CHAOS_SEED=7,9`` runs those);
the default is three for CI. ``GACTOR_CHAOS_SECONDS`` bounds the moment of the kill
(default 6 s of chaos; each seed takes roughly 15-25 s in all). The schedule each worker
follows is drawn from its own ``random.Random``, so a seed repeats the same decisions,
though trio's interleaving of the clients (and so some outcomes) differs run to run.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

import gactor
from gactor import (
    ContainerSpec,
    CPULimits,
    GardenError,
    Limits,
    MemoryLimits,
    ProcessIO,
    ProcessSpec,
    StreamInSpec,
)
from gactor.errors import ProcessNotFoundError
from gactor.kernel import depot, shims

from .helpers import (
    CGROUP_ROOT,
    E2E_MARKS,
    Sink,
    StdinGate,
    one_file_tar,
    proc_status,
    wait_for,
    wait_until_equal,
)
from .servers import ServerProcess

pytestmark = E2E_MARKS

MiB = 1 << 20
POOL = "10.247.30.0/24"
WORKERS = 3
MAX_LIVE_PER_WORKER = 3
CHAOS_SECONDS = float(os.environ.get("GACTOR_CHAOS_SECONDS", "6"))
MEMORY_CHOICES = [0, 64 * MiB, 96 * MiB, 128 * MiB, 192 * MiB]  # 0: no limit
SHARES_CHOICES = [0, 50, 128, 300, 512, 700, 1024]  # 0: no limit
PROPERTY_KEYS = ["colour", "owner", "tier", "note"]
STREAM_DIR = "/tmp/in"
SHIM_DIED_EVENT = "container shim exited unexpectedly: its processes are lost"
CALL_TIMEOUT = 60.0  # no single call may take longer, whatever the machine's load


def _seeds() -> list[int]:
    if n := os.environ.get("GACTOR_CHAOS_SEEDS"):
        return list(range(1, int(n) + 1))
    if chosen := os.environ.get("GACTOR_CHAOS_SEED"):
        return [int(s) for s in chosen.split(",")]
    return [5, 9, 13]  # a shim kill then SIGKILL, a shim kill then SIGTERM, a server kill


# ---- the model of what the server acknowledged ------------------------------------------


@dataclass
class ProcModel:
    id: str
    kind: str  # "short", "long", "stdin"
    code: int
    acked: bool = False  # run returned


@dataclass
class ContainerModel:
    handle: str
    # "creating" (in flight), "acked", "destroying" (in flight), "destroyed", "failed"
    state: str
    props: dict[str, set[str | None]]  # every value each key may have (None: absent)
    memory: set[int]
    shares: set[int]
    files: dict[str, set[bytes | None]] = field(default_factory=dict)
    partial: set[str] = field(default_factory=set)  # in flight: any prefix of the content may be there
    procs: dict[str, ProcModel] = field(default_factory=dict)
    shim_killed: bool = False
    shim_pid: int = 0  # the one killed
    in_flight: list[str] = field(default_factory=list)  # the calls on it not answered yet
    in_flight_at_kill: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return depot.dir_name(self.handle)


class Model:
    def __init__(self) -> None:
        self.containers: dict[str, ContainerModel] = {}
        self.server_killed = False  # set just before the kill: every failure from then on is expected
        self.stop = False  # the workers stop at their next step
        self.problems: list[str] = []
        self.steps: list[str] = []

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def step(self, text: str) -> None:
        self.steps.append(text)


# ---- the chaos phase ----------------------------------------------------------------------


class Worker:
    """One client on its own connection, following its own seeded schedule."""

    def __init__(self, model: Model, client: Any, seed: int, index: int) -> None:
        self.model = model
        self.client = client
        self.rng = random.Random(f"{seed}:{index}")
        self.prefix = f"chaos{seed}-w{index}"
        self.live: list[str] = []  # acknowledged containers this worker owns
        self.handles: dict[str, Any] = {}  # their client-side Container objects
        self.serial = 0

    def _next(self) -> int:
        self.serial += 1
        return self.serial

    async def attempt(self, what: str, call: Callable[[], Awaitable[Any]], c: ContainerModel | None = None,
                      tolerate: Callable[[], bool] = lambda: False) -> bool:
        """Whether the server acknowledged ``call`` (on container ``c``). A failure is a
        problem unless ``tolerate()``, or the server was killed, or ``c``'s shim was
        (then the call's effect is unknown): a dead shim fails only its own container."""
        self.model.step(what)
        if c is not None:
            c.in_flight.append(what.split()[0])
        try:
            with trio.fail_after(CALL_TIMEOUT):
                await call()
        except GardenError as err:
            if not (self.model.server_killed or (c is not None and c.shim_killed) or tolerate()):
                self.model.problem(f"{what}: {err!r}")
            return False
        except trio.TooSlowError:
            self.model.problem(f"{what}: no answer within {CALL_TIMEOUT} s")
            return False
        finally:
            if c is not None:
                c.in_flight.remove(what.split()[0])
        return True

    async def run(self) -> None:
        async with trio.open_nursery() as background:
            while not self.model.stop:
                await trio.lowlevel.checkpoint()  # even when every call fails at once
                await self.act(background)

    async def act(self, background: trio.Nursery) -> None:
        rng = self.rng
        actions: list[tuple[int, Callable[[], Awaitable[None]]]] = []
        if len(self.live) < MAX_LIVE_PER_WORKER:
            actions.append((4 if not self.live else 2, self.create))
        usable = [h for h in self.live if not self.model.containers[h].shim_killed]
        if usable:
            c = self.model.containers[rng.choice(usable)]
            actions += [
                (3, lambda: self.run_short(c)),
                (2, lambda: self.run_long(c, background)),
                (2, lambda: self.run_stdin(c, background)),
                (2, lambda: self.stream_in(c)),
                (2, lambda: self.set_property(c)),
                (1, lambda: self.remove_property(c)),
                (1, lambda: self.limit_memory(c)),
                (1, lambda: self.limit_cpu(c)),
                (1, lambda: self.check(c)),
                (1, lambda: self.destroy(c)),
            ]
        others = [c for c in self.model.containers.values()
                  if c.state == "acked" and not c.shim_killed and c.handle not in self.live]
        if others:
            other = rng.choice(others)
            actions.append((1, lambda: self.attach_other(other, background)))
        [action] = rng.choices([a for _, a in actions], weights=[w for w, _ in actions])
        await action()

    async def create(self) -> None:
        rng = self.rng
        handle = f"{self.prefix}-c{self._next()}"
        props = {k: f"{k}-{rng.randrange(100)}" for k in rng.sample(PROPERTY_KEYS, rng.randrange(3))}
        memory = rng.choice(MEMORY_CHOICES)
        shares = rng.choice(SHARES_CHOICES)
        c = self.model.containers[handle] = ContainerModel(
            handle, "creating", {k: {v} for k, v in props.items()}, {memory}, {shares})
        spec = ContainerSpec(handle=handle, properties=props, grace_time=3600,
                             limits=Limits(memory=MemoryLimits(limit_in_bytes=memory),
                                           cpu=CPULimits(limit_in_shares=shares)))
        created: list[Any] = []
        if await self.attempt(f"create {handle} props={props} memory={memory} shares={shares}",
                              lambda: _append(created, self.client.create(spec))):
            c.state = "acked"
            self.live.append(handle)
            self.handles[handle] = created[0]
        elif not self.model.server_killed:
            c.state = "failed"

    def _container(self, c: ContainerModel) -> Any:
        return self.handles[c.handle]

    async def run_short(self, c: ContainerModel) -> None:
        code = self.rng.randrange(120)
        p = self._proc(c, "short", code)
        out = Sink()
        started: list[Any] = []

        async def run() -> None:
            started.append(await self._container(c).run(
                ProcessSpec(id=p.id, path="sh", args=["-c", f"echo {p.id}; exit {code}"]),
                ProcessIO(stdout=out)))

        if not await self.attempt(f"run {c.handle}/{p.id} exit {code}", run, c):
            return
        p.acked = True
        got: list[int] = []
        if await self.attempt(f"wait {c.handle}/{p.id}", lambda: _append(got, started[0].wait()), c):
            if got != [code] or bytes(out.data) != f"{p.id}\n".encode():
                self.model.problem(f"{c.handle}/{p.id}: exited {got} with {bytes(out.data)!r}, "
                                   f"expected {code} with {p.id!r}")

    async def run_long(self, c: ContainerModel, background: trio.Nursery) -> None:
        code = self.rng.randrange(120)
        seconds = self.rng.choice([0.5, 1, 2, 3])
        p = self._proc(c, "long", code)
        started: list[Any] = []

        async def run() -> None:
            started.append(await self._container(c).run(
                ProcessSpec(id=p.id, path="sh", args=["-c", f"sleep {seconds}; exit {code}"]),
                ProcessIO(stdout=Sink())))

        if await self.attempt(f"run {c.handle}/{p.id} sleep {seconds}; exit {code}", run, c):
            p.acked = True
            background.start_soon(self.wait_background, c, p, started[0], None, 0.0)

    async def run_stdin(self, c: ContainerModel, background: trio.Nursery) -> None:
        code = self.rng.randrange(120)
        now = self.rng.random() < 0.5
        p = self._proc(c, "stdin", code)
        gate = None if now else StdinGate()
        started: list[Any] = []

        async def run() -> None:
            stdin = f"{code}\n".encode() if gate is None else gate
            started.append(await self._container(c).run(
                ProcessSpec(id=p.id, path="sh", args=["-c", "read x; exit $x"]),
                ProcessIO(stdin=stdin, stdout=Sink())))

        how = "at once" if now else "later"
        if await self.attempt(f"run {c.handle}/{p.id} read x; exit $x (fed {code} {how})", run, c):
            p.acked = True
            background.start_soon(self.wait_background, c, p, started[0], gate, self.rng.uniform(0, 3))

    async def wait_background(self, c: ContainerModel, p: ProcModel, proc: Any,
                              gate: StdinGate | None, feed_after: float) -> None:
        if gate is not None:
            await trio.sleep(feed_after)  # the schedule's pause, not a wait for a condition
            self.model.step(f"feed {c.handle}/{p.id} {p.code}")
            gate.release(f"{p.code}\n".encode())
        try:
            with trio.fail_after(CALL_TIMEOUT):
                code = await proc.wait()
        except GardenError as err:
            if c.shim_killed and c.handle not in str(err):
                self.model.problem(f"wait {c.handle}/{p.id}: its shim died, and the error does not say which "
                                   f"container: {err!r}")
            elif not self.model.server_killed and not c.shim_killed and c.state == "acked":
                self.model.problem(f"wait {c.handle}/{p.id}: {err!r}")
            return
        if code != p.code and c.state == "acked":
            self.model.problem(f"{c.handle}/{p.id} ({p.kind}) exited {code}, expected {p.code}")

    async def attach_other(self, c: ContainerModel, background: trio.Nursery) -> None:
        """Attach from this client to another client's process (output from now on, no
        stdin) and expect the same exit code."""
        running = [p for p in c.procs.values() if p.acked and p.kind != "short"]
        if not running:
            return
        p = self.rng.choice(running)
        attached: list[Any] = []

        async def attach() -> None:
            container = await self.client.lookup(c.handle)
            attached.append(await container.attach(p.id, ProcessIO(stdout=Sink())))

        # Its owner may destroy it meanwhile: then "not found" is right.
        if await self.attempt(f"attach {c.handle}/{p.id} from another client", attach, c,
                              tolerate=lambda: c.state != "acked"):
            background.start_soon(self.wait_background, c, p, attached[0], None, 0.0)

    def _proc(self, c: ContainerModel, kind: str, code: int) -> ProcModel:
        p = ProcModel(f"p{self._next()}-{kind}", kind, code)
        c.procs[p.id] = p
        return p

    async def stream_in(self, c: ContainerModel) -> None:
        name = f"f{self._next()}"
        big = self.rng.random() < 0.2  # many frames: more likely in flight at the kill
        data = self.rng.randbytes(self.rng.randrange(256 << 10, 3 << 20) if big else self.rng.randrange(1, 3000))
        c.files[name] = {None, data}
        c.partial.add(name)
        spec = StreamInSpec(path=STREAM_DIR, user="root", tar_stream=one_file_tar(name, data))
        if await self.attempt(f"stream_in {c.handle} {name} ({len(data)} bytes)",
                              lambda: self._container(c).stream_in(spec), c):
            c.files[name] = {data}
            c.partial.discard(name)

    async def set_property(self, c: ContainerModel) -> None:
        key, value = self.rng.choice(PROPERTY_KEYS), f"v{self._next()}"
        c.props.setdefault(key, {None}).add(value)
        if await self.attempt(f"set_property {c.handle} {key}={value}",
                              lambda: self._container(c).set_property(key, value), c):
            c.props[key] = {value}

    async def remove_property(self, c: ContainerModel) -> None:
        key = self.rng.choice(PROPERTY_KEYS)
        c.props.setdefault(key, {None}).add(None)
        if await self.attempt(f"remove_property {c.handle} {key}",
                              lambda: self._container(c).remove_property(key), c):
            c.props[key] = {None}

    async def limit_memory(self, c: ContainerModel) -> None:
        limit = self.rng.choice(MEMORY_CHOICES[1:])
        c.memory.add(limit)
        if await self.attempt(f"limit_memory {c.handle} {limit}",
                              lambda: self._container(c).limit_memory(MemoryLimits(limit_in_bytes=limit)), c):
            c.memory = {limit}

    async def limit_cpu(self, c: ContainerModel) -> None:
        shares = self.rng.choice(SHARES_CHOICES[1:])
        c.shares.add(shares)
        if await self.attempt(f"limit_cpu {c.handle} {shares}",
                              lambda: self._container(c).limit_cpu(CPULimits(limit_in_shares=shares)), c):
            c.shares = {shares}

    async def check(self, c: ContainerModel) -> None:
        """While nothing is in flight on this container, the server answers exactly the model."""
        got: dict[str, Any] = {}

        async def read() -> None:
            container = self._container(c)
            got["info"] = await container.info()
            got["memory"] = await container.current_memory_limits()
            got["cpu"] = await container.current_cpu_limits()

        if not await self.attempt(f"check {c.handle}", read, c):
            return
        if self.model.server_killed or c.shim_killed:
            return
        problems = container_differences(c, got["info"], got["memory"], got["cpu"])
        self.model.problems += [f"check {c.handle} before the kill: {p}" for p in problems]

    async def destroy(self, c: ContainerModel) -> None:
        self.live.remove(c.handle)
        c.state = "destroying"
        if await self.attempt(f"destroy {c.handle}", lambda: self.client.destroy(c.handle), c):
            c.state = "destroyed"


async def _append(into: list[Any], value: Awaitable[Any]) -> None:
    into.append(await value)


async def reader(model: Model, client: Any) -> None:
    """Another client listing and bulk-infoing all the while: what it sees is known."""
    while not model.stop:
        gone_before = {h for h, c in model.containers.items() if c.state in ("destroyed", "failed")}
        try:
            with trio.fail_after(CALL_TIMEOUT):
                handles = [c.handle for c in await client.containers()]
                infos = await client.bulk_info(handles)
        except GardenError as err:
            if not model.server_killed:
                model.problem(f"reader: {err!r}")
            return
        if model.server_killed:
            return
        for handle in handles:
            if handle not in model.containers:
                model.problem(f"reader: unknown container {handle!r} listed")
            elif handle in gone_before:
                model.problem(f"reader: {handle} listed after its destroy (or failed create) was answered")
        for handle, entry in infos.items():
            if entry.err is not None and not isinstance(entry.err, gactor.ContainerNotFoundError):
                model.problem(f"reader: bulk_info {handle}: {entry.err!r}")
        await trio.sleep(0.05)



# ---- comparing the server with the model ----------------------------------------------


def container_differences(c: ContainerModel, info: Any, memory: MemoryLimits, cpu: CPULimits) -> list[str]:
    found = []
    for key, possible in c.props.items():
        if info.properties.get(key) not in possible:
            found.append(f"property {key}={info.properties.get(key)!r}, expected one of {possible}")
    # The server's own garden.network.* properties come with every container (Garden's too).
    unknown = {k for k in info.properties if not k.startswith("garden.network.")} - set(c.props)
    if unknown:
        found.append(f"unknown properties {sorted(unknown)}")
    if memory.limit_in_bytes not in c.memory:
        found.append(f"memory limit {memory.limit_in_bytes}, expected one of {c.memory}")
    if cpu.limit_in_shares not in c.shares:
        found.append(f"cpu limit_in_shares {cpu.limit_in_shares}, expected one of {c.shares}")
    return found


def cgroup_value(server: ServerProcess, controller: str, c: ContainerModel, file: str) -> str:
    with open(os.path.join(CGROUP_ROOT, controller, server.cgroup_parent, c.name, file)) as f:
        return f.read().strip()


def host_differences(server: ServerProcess, c: ContainerModel) -> list[str]:
    """The container's limits in its cgroup files and its files in its rootfs, read on the host."""
    found = []
    if os.path.isdir(os.path.join(CGROUP_ROOT, "memory")):  # cgroup v1 files
        memory = int(cgroup_value(server, "memory", c, "memory.limit_in_bytes"))
        if memory not in c.memory and not (memory > 1 << 50 and 0 in c.memory):
            found.append(f"memory.limit_in_bytes {memory}, expected one of {c.memory}")
        shares = int(cgroup_value(server, "cpu", c, "cpu.shares"))
        if shares not in c.shares and not (shares == 1024 and 0 in c.shares):
            found.append(f"cpu.shares {shares}, expected one of {c.shares}")
    for name, possible in c.files.items():
        path = os.path.join(server.container_root(c.handle), STREAM_DIR.lstrip("/"), name)
        try:
            with open(path, "rb") as f:
                content: bytes | None = f.read()
        except FileNotFoundError:
            content = None
        if name in c.partial and content is not None and any(p and p.startswith(content) for p in possible):
            continue
        if content not in possible:
            shown = "absent" if content is None else f"{len(content)} bytes"
            found.append(f"file {name}: {shown}, expected one of "
                         f"{['absent' if p is None else f'{len(p)} bytes' for p in possible]}")
    return found


# ---- the test ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", _seeds())
async def test_chaos(own_servers, seed):
    server = own_servers(f"chaos{seed}", POOL)
    await server.start()
    model = Model()
    rng = random.Random(seed)
    kill_at = rng.uniform(1.5, max(1.5, CHAOS_SECONDS))
    target = rng.choice(["server", "shim"])
    restart_signal = rng.choice([signal.SIGKILL, signal.SIGTERM])
    server.note(f"chaos seed {seed}: kill the {target} after {kill_at:.2f} s")

    victim = await chaos_phase(server, model, seed, kill_at, target)
    if victim is not None:
        await check_broken(server, model, victim)
        model.step(f"stop the server ({restart_signal.name})")
        await server.kill(restart_signal)
    await server.start()
    model.step("restarted")
    await check_after_restart(server, model)
    model.problems += log_problems(server, victim)
    assert not model.problems, report(seed, model, server)
    await destroy_everything(server, model)
    assert not model.problems, report(seed, model, server)
    await server.finish()
    print(summary(seed, model, victim, kill_at))


def summary(seed: int, model: Model, victim: ContainerModel | None, kill_at: float) -> str:
    states: dict[str, int] = {}
    for c in model.containers.values():
        states[c.state] = states.get(c.state, 0) + 1
    procs = [p for c in model.containers.values() for p in c.procs.values()]
    target = "server" if victim is None else f"shim of {victim.handle} (in flight: {victim.in_flight_at_kill})"
    return (f"\nchaos seed {seed}: killed the {target} at {kill_at:.1f} s after {len(model.steps)} steps; "
            f"containers {states}; processes {len(procs)} ({sum(p.acked for p in procs)} acknowledged)")


async def chaos_phase(server: ServerProcess, model: Model, seed: int, kill_at: float,
                      target: str) -> ContainerModel | None:
    """Run the workers until ``kill_at``, then kill; returns the container whose shim was
    killed (None: the server was)."""
    victim: ContainerModel | None = None
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(server.connect()) for _ in range(WORKERS + 1)]
        async with trio.open_nursery() as nursery:
            for i in range(WORKERS):
                nursery.start_soon(Worker(model, clients[i], seed, i).run)
            nursery.start_soon(reader, model, clients[WORKERS])
            await trio.sleep(kill_at)  # the schedule's random moment
            candidates = [c for c in model.containers.values() if c.state == "acked"]
            busy = [c for c in candidates if c.in_flight]  # a call on it in flight (a StreamIn, say)
            if target == "shim" and candidates:
                pick = random.Random(seed)
                victim = pick.choice(busy if busy and pick.random() < 0.5 else candidates)
                pid = shims.find(os.path.join(server.depot, depot.CONTAINERS)).get(victim.name)
                assert pid is not None, f"no shim found for {victim.handle}"
                model.step(f"kill -9 the shim of {victim.handle} (pid {pid}, in flight: {victim.in_flight})")
                server.note(model.steps[-1])
                victim.shim_killed = True
                victim.shim_pid = pid
                victim.in_flight_at_kill = list(victim.in_flight)
                os.kill(pid, signal.SIGKILL)
                # The clients go on for a while: only the victim's calls may fail.
                await trio.sleep(random.Random(seed).uniform(0.5, 2.5))
            else:
                model.step("kill -9 the server")
                server.note(model.steps[-1])
                model.server_killed = model.stop = True  # no new calls meet the dying server
                await server.kill(signal.SIGKILL)
            model.stop = True
            nursery.cancel_scope.cancel()
    return victim


async def check_broken(server: ServerProcess, model: Model, victim: ContainerModel) -> None:
    """The server still runs: the container whose shim died says so, and fails clearly."""
    async with server.connect() as client:
        container = await client.lookup(victim.handle)

        # SIGKILL takes effect when the shim leaves the kernel (a fork or a cgroup write
        # under load can hold it in D state): the server can only notice from then on.
        killed_at = trio.current_time()
        await wait_for(lambda: proc_status(victim.shim_pid).get("State", "X")[:1] in ("Z", "X"), within=60,
                       what=f"the killed shim {victim.shim_pid} to exit")
        model.step(f"the killed shim exited after {trio.current_time() - killed_at:.2f} s")
        deadline = trio.current_time() + 15
        while (info := await container.info()).state != "broken":
            if trio.current_time() > deadline:
                model.problem(f"{victim.handle}: still {info.state!r} 15 s after its shim was killed; "
                              f"{shim_diagnosis(server, victim)}")
                return
            await trio.sleep(0.05)
        if SHIM_DIED_EVENT not in info.events:
            model.problem(f"{victim.handle}: broken but events are {info.events}")
        if info.process_ids:
            model.problem(f"{victim.handle}: broken but lists running processes {info.process_ids}")
        try:
            await container.run(ProcessSpec(path="true"), ProcessIO())
            model.problem(f"{victim.handle}: run succeeded in a broken container")
        except GardenError as err:
            if "broken" not in str(err):
                model.problem(f"{victim.handle}: run failed without naming the state: {err}")
        for p in victim.procs.values():
            if not p.acked:
                continue
            try:
                with trio.fail_after(CALL_TIMEOUT):
                    proc = await container.attach(p.id, ProcessIO(stdout=Sink()))
                    code = await proc.wait()
            except GardenError as err:
                if victim.handle not in str(err):
                    model.problem(f"{victim.handle}/{p.id}: the error does not name the container: {err}")
                continue
            if code != p.code:
                model.problem(f"{victim.handle}/{p.id}: exited {code} before the shim died, expected {p.code}")


def shim_diagnosis(server: ServerProcess, victim: ContainerModel) -> str:
    """What the host says about a killed shim the server did not notice."""
    status = proc_status(victim.shim_pid)
    pidfds = []
    fd_dir = f"/proc/{server.pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            if os.readlink(os.path.join(fd_dir, fd)) == "anon_inode:[pidfd]":
                with open(f"/proc/{server.pid}/fdinfo/{fd}") as f:
                    pid_line = [line for line in f.read().splitlines() if line.startswith("Pid:")]
                pidfds.append(f"{fd}:{pid_line[0].split()[1] if pid_line else '?'}")
    return (f"killed pid {victim.shim_pid}: state {status.get('State', 'gone')}, ppid {status.get('PPid')}; "
            f"shims now {shims.find(os.path.join(server.depot, depot.CONTAINERS))}; "
            f"shim.pid {_read(os.path.join(server.container_dir(victim.handle), 'shim.pid'))}; "
            f"server pidfds (fd:pid) {sorted(pidfds)}")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as err:
        return str(err)


async def check_after_restart(server: ServerProcess, model: Model) -> None:
    async with server.connect() as client:
        listed = {c.handle for c in await client.containers()}
        for handle in sorted(listed):
            c = model.containers.get(handle)
            if c is None:
                model.problem(f"unknown container {handle!r} listed after the restart")
            elif c.shim_killed:
                model.problem(f"{handle}: its shim was killed, yet it was re-adopted")
            elif c.state not in ("acked", "creating", "destroying"):
                model.problem(f"{handle} ({c.state}) listed after the restart")
        for c in model.containers.values():
            if c.state == "acked" and not c.shim_killed and c.handle not in listed:
                model.problem(f"{c.handle}: acknowledged, not listed after the restart")
        names = sorted(depot.dir_name(h) for h in listed)
        host = server.snapshot()
        if host["container dirs"] != names:
            model.problem(f"container dirs {host['container dirs']} but listed {names}")
        live_shims = sorted(shims.find(os.path.join(server.depot, depot.CONTAINERS)))
        if live_shims != names:
            model.problem(f"shims of {live_shims} but listed {names}")
        async with trio.open_nursery() as nursery:
            for handle in sorted(listed & model.containers.keys()):
                nursery.start_soon(check_container, server, model, client, model.containers[handle])


async def check_container(server: ServerProcess, model: Model, client: Any, c: ContainerModel) -> None:
    container = await client.lookup(c.handle)
    info = await container.info()
    if c.state == "destroying":
        return  # half torn down, maybe: it only has to be destroyable
    problems = container_differences(c, info, await container.current_memory_limits(),
                                     await container.current_cpu_limits())
    problems += host_differences(server, c)
    if info.state != "active":
        problems.append(f"state {info.state!r}, events {info.events}")
    unknown = [p for p in info.process_ids if p not in c.procs and not p.startswith("gactor-tar-")]
    if unknown:
        problems.append(f"unknown running processes {unknown}")
    model.problems += [f"{c.handle} after the restart: {p}" for p in problems]
    async with trio.open_nursery() as nursery:
        for p in c.procs.values():
            nursery.start_soon(check_process, model, container, c, p)
    out = Sink()
    with trio.fail_after(CALL_TIMEOUT):
        code = await (await container.run(ProcessSpec(path="echo", args=["ok"]), ProcessIO(stdout=out))).wait()
    if (code, bytes(out.data)) != (0, b"ok\n"):
        model.problem(f"{c.handle}: a new process after the restart gave {code} {bytes(out.data)!r}")


async def check_process(model: Model, container: Any, c: ContainerModel, p: ProcModel) -> None:
    """Re-attach; a stdin-fed process gets its K again (it may never have arrived)."""
    stdin = f"{p.code}\n".encode() if p.kind == "stdin" else None
    try:
        with trio.fail_after(CALL_TIMEOUT):
            proc = await container.attach(p.id, ProcessIO(stdin=stdin, stdout=Sink()))
            code = await proc.wait()
    except ProcessNotFoundError:
        if p.acked:
            model.problem(f"{c.handle}/{p.id}: acknowledged, not found after the restart")
        return
    except (GardenError, trio.TooSlowError) as err:
        model.problem(f"{c.handle}/{p.id}: re-attach failed: {err!r}")
        return
    # A run whose call failed (the server stopping, say) is abandoned by the client, which
    # ends the stdin it would have sent (``open_stream``): such a process may have read
    # EOF before its K came, and ``read x; exit $x`` then exits 1.
    abandoned_stdin = p.kind == "stdin" and not p.acked and code == 1
    if code != p.code and not abandoned_stdin:
        model.problem(f"{c.handle}/{p.id} ({p.kind}, {'acked' if p.acked else 'in flight'}): "
                      f"re-attached exit code {code}, expected {p.code}")


async def destroy_everything(server: ServerProcess, model: Model) -> None:
    """Every container destroys; then nothing is left on the host while the server runs."""
    async with server.connect() as client:
        for container in await client.containers():
            try:
                with trio.fail_after(CALL_TIMEOUT):
                    await client.destroy(container.handle)
            except GardenError as err:
                model.problem(f"destroy {container.handle} after the restart: {err!r}")
        left = [c.handle for c in await client.containers()]
        if left:
            model.problem(f"still listed after destroying all: {left}")
    await wait_until_equal(server.snapshot, server.empty(), within=15)


def log_problems(server: ServerProcess, victim: ContainerModel | None) -> list[str]:
    """Tracebacks, and errors but the one a killed shim explains, in the server's log."""
    found = []
    for line in server.log_text().splitlines():
        if "Traceback" in line or " ERROR " in line and not (
                victim is not None and f"container {victim.handle}: its shim died" in line):
            found.append(f"server log: {line[:300]}")
    return found


def report(seed: int, model: Model, server: ServerProcess) -> str:
    handles = set(re.findall(r"chaos\d+-w\d+-c\d+", " ".join(model.problems)))
    named = [step for step in model.steps if any(h in step.split("/")[0].split() for h in handles)]
    steps = "\n  ".join((named or model.steps)[-60:] + ["..."] + model.steps[-5:])
    problems = "\n  ".join(model.problems)
    return (f"seed {seed}: {len(model.problems)} problems:\n  {problems}\n"
            f"last steps:\n  {steps}\nserver log:\n{server.log_tail(60)}")


# ---- the smallest reproductions of what the chaos test found -----------------------------------


async def test_limit_cpu_on_a_container_created_without_one_reads_back(gactor_server, create_container):
    """Found by seed 7: ``current_cpu_limits`` answered from the snapshot the container
    published at creation (no CPU limit: all zero) after a ``limit_cpu`` had been
    acknowledged and applied, until some other change republished it."""
    container = await create_container()
    await container.limit_cpu(CPULimits(limit_in_shares=700))
    assert await container.current_cpu_limits() == CPULimits(limit_in_shares=700)
    shares = os.path.join(CGROUP_ROOT, "cpu", gactor_server.cgroup_parent, container.handle, "cpu.shares")
    if os.path.exists(shares):  # cgroup v1
        with open(shares) as f:
            assert f.read().strip() == "700"


async def test_restart_with_a_running_process_whose_stdin_was_closed(own_servers):
    """Found by seed 13: after ``kill -9``, a container holding a process whose stdin the
    client had closed (and which still ran, or had not been drained yet) could not be
    re-adopted: the shim answered ``attach`` by sending the stdin fd it had closed, so
    the acknowledged container was removed at startup, its processes killed."""
    server = own_servers("stdin-closed", "10.247.31.0/24")
    await server.start()
    async with server.connect() as client:
        c = await client.create(ContainerSpec(handle="stdin-closed"))
        out = Sink()
        await c.run(ProcessSpec(id="reader", path="sh", args=["-c",
            "cat >/dev/null; echo eof; while [ ! -e /tmp/go ]; do sleep 0.05; done; exit 3"]),
            ProcessIO(stdin=b"some input", stdout=out))  # fmt: skip
        # "eof" proves the shim closed its end too: the process saw end of file.
        await wait_for(lambda: out.data == b"eof\n", what="the process to see the end of its stdin")
    await server.kill(signal.SIGKILL)
    await server.start()
    async with server.connect() as client:
        assert [c.handle for c in await client.containers()] == ["stdin-closed"], server.log_tail()
        c = await client.lookup("stdin-closed")
        proc = await c.attach("reader", ProcessIO(stdout=Sink()))
        await (await c.run(ProcessSpec(path="touch", args=["/tmp/go"]), ProcessIO())).wait()
        with trio.fail_after(15):
            assert await proc.wait() == 3
    await server.finish()
