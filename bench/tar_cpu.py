"""``python -m bench.tar_cpu``: CPU time of StreamIn's and StreamOut's tar alone, per archive.

The end-to-end StreamIn/StreamOut rows of ``python -m bench`` swing with the load of this
shared host; the CPU one tar program spends on the same archive hardly does. Per round,
alternating, on the host (a temp dir under /tmp, no server, no container):

* ``tar_in``: ``gactor.kernel.tar_in.main`` in a forked child (as the shim runs it: no
  exec, no interpreter start) extracting a tar of one ``--mib`` MiB file from a pipe;
* ``busybox -x``: ``busybox tar -xf -`` on the same input (StreamIn before issue 9);
* ``tar_out``: ``gactor.kernel.tar_out.main`` archiving that file to a pipe, drained;
* ``busybox -c``: ``busybox tar -cf - blob`` the same way (StreamOut before issue 9).

Each figure is the child's utime+stime (``wait4``'s rusage), in ms, median over rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tarfile
import tempfile
import threading
from collections.abc import Callable

from gactor.kernel import tar_in, tar_out

MiB = 1 << 20
BUSYBOX = "/bin/busybox"


def _child(body: Callable[[], int], stdin: int, stdout: int, cwd: str) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(stdin, 0)
            os.dup2(stdout, 1)
            os.chdir(cwd)
            os._exit(body())
        finally:
            os._exit(127)
    return pid


def _cpu_ms(pid: int) -> float:
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the tar child exited with {os.waitstatus_to_exitcode(status)}")
    return (usage.ru_utime + usage.ru_stime) * 1e3


def extract(body: Callable[[], int], mib: int, into: str) -> float:
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    pid = _child(body, r, null, into)
    os.close(r)
    os.close(null)
    header = tarfile.TarInfo("blob")
    header.size = mib * MiB
    chunk = b"\xa5" * MiB
    with os.fdopen(w, "wb") as f:
        f.write(header.tobuf(format=tarfile.PAX_FORMAT))
        for _ in range(mib):
            f.write(chunk)
        f.write(bytes(2 * tarfile.BLOCKSIZE))
    return _cpu_ms(pid)


def archive(body: Callable[[], int], cwd: str, mib: int) -> float:
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    pid = _child(body, null, w, cwd)
    os.close(w)
    os.close(null)
    got = 0

    def drain() -> None:
        nonlocal got
        while data := os.read(r, MiB):
            got += len(data)

    reader = threading.Thread(target=drain)
    reader.start()
    cpu = _cpu_ms(pid)
    reader.join()
    os.close(r)
    if got < mib * MiB:
        raise RuntimeError(f"the archive had {got} bytes, less than the file")
    return cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tar_cpu", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds [7]")
    p.add_argument("--mib", type=int, default=100, help="size of the one file in the archive [100]")
    args = p.parse_args(argv)
    top = tempfile.mkdtemp(prefix="gactor-tar-cpu-", dir="/tmp")
    samples: dict[str, list[float]] = {"tar_in": [], "busybox -x": [], "tar_out": [], "busybox -c": []}
    try:
        for _ in range(args.rounds):
            for name, body in (("tar_in", lambda: tar_in.main([])),
                               ("busybox -x", lambda: os.execv(BUSYBOX, ["tar", "-xf", "-"]))):
                into = os.path.join(top, "in")
                shutil.rmtree(into, ignore_errors=True)
                os.mkdir(into)
                samples[name].append(extract(body, args.mib, into))
            for name, body in (("tar_out", lambda: tar_out.main(["blob"])),
                               ("busybox -c", lambda: os.execv(BUSYBOX, ["tar", "-cf", "-", "blob"]))):
                samples[name].append(archive(body, into, args.mib))
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print(f"CPU ms (utime+stime of the tar child) per {args.mib} MiB archive, {args.rounds} rounds:")
    for name, values in samples.items():
        print(f"  {name:<11} median {statistics.median(values):7.1f}  min {min(values):7.1f}  "
              f"max {max(values):7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
