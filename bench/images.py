"""``python -m bench.images``: pulling and creating from registry images, gactor side by
side with ``skopeo copy`` + ``umoci unpack`` of the same image in the same run.

It starts its own server (temp depot, network pool 10.251.12.0/24) and its own
``docker-registry`` on 127.0.0.1 (``tests/registry_docker.py``: a config of its own,
storage in the bench's temp dir), builds an image (the busybox layer, ``--mib`` MiB of
incompressible files in ``--files`` files, and the tests' whiteout/opaque layer) as gzip
and, from the same tars, as zstd, pushes both with ``skopeo copy``, then, in rounds in
which each contender goes first in turn:

- **first pull, gactor**: ``client.pull(docker://...)`` into an empty layer store (the
  store is pruned, untimed, after each pull): manifest, config and every layer
  downloaded, digest-checked and unpacked;
- **skopeo copy + umoci unpack**: the same image into a fresh OCI layout, then unpacked
  by umoci (as root) into a fresh bundle; each half is also reported alone;
- **first pull, gactor, zstd**: the same tars as zstd layers (umoci 0.4.7 reads no zstd);

and then the creates, interleaved with a plain create as the baseline of the same
moment: from the cached image (``docker://``: its manifest is fetched again, the layers
are in the store), from the same image with a disk limit (``limits.disk.byte_hard``,
exclusive scope: a loop-mounted ext4 is made for the upper dir), and from the default
rootfs directory. Every container is destroyed untimed; the host is checked for
leftovers at the end (``server.run_scenario``).
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import resource
import shutil
import tarfile
from pathlib import Path
from time import perf_counter
from typing import Any

import trio

import gactor
from gactor import ContainerSpec, DiskLimits, DiskLimitScope, ImageRef, Limits
from tests.oci_images import default_layers, write_layout, zstd
from tests.registry_docker import DockerRegistry, skopeo, tool

from . import server as srv
from .report import Series

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_ROOTFS = os.environ.get("GACTOR_ROOTFS_DIR", "/var/lib/gactor/images/busybox")
POOL = "10.251.12.0/24"  # clear of the tests' (10.248/16, 10.250/16) and the other benches' pools
OP_TIMEOUT = 300.0
MiB = 1 << 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.images", description=__doc__.splitlines()[0])
    p.add_argument("--pulls", type=int, default=5, help="rounds of first pulls, each tool once per round [5]")
    p.add_argument("--runs", type=int, default=10, help="rounds of creates, each kind once per round [10]")
    p.add_argument("--mib", type=int, default=64, help="MiB of incompressible payload in the image [64]")
    p.add_argument("--files", type=int, default=64, help="files the payload is split into [64]")
    p.add_argument("--disk-mib", type=int, default=256, help="the disk-limited creates' byte_hard, MiB [256]")
    p.add_argument("--rootfs", default=DEFAULT_ROOTFS, help=f"server --default-rootfs [{DEFAULT_ROOTFS}]")
    p.add_argument("--network-pool", default=POOL, help=f"server --network-pool [{POOL}]")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    return p.parse_args(argv)


def payload_tar(mib: int, files: int) -> bytes:
    """``mib`` MiB of random bytes in ``files`` files under /payload, as a tar."""
    buf = io.BytesIO()
    size = max(1, mib * MiB // max(1, files))
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("payload")
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1700000000
        tar.addfile(info)
        for n in range(files):
            info = tarfile.TarInfo(f"payload/{n:04d}")
            info.size, info.mode, info.mtime = size, 0o644, 1700000000
            tar.addfile(info, io.BytesIO(os.urandom(size)))
    return buf.getvalue()


def build_image(base: str, mib: int, files: int) -> str:
    """The bench image's OCI layout: tag ``bench`` (gzip layers, level 1) and
    ``bench-zstd`` (the same tars, zstd level 3)."""
    busybox, top = default_layers()
    tars = [gzip.decompress(busybox), payload_tar(mib, files), top]
    layout = os.path.join(base, "layout")
    write_layout(layout, {"bench": ([gzip.compress(t, compresslevel=1, mtime=0) for t in tars], None),
                          "bench-zstd": ([zstd(t) for t in tars], None)})
    return layout


def server_cpu_ms(pid: int) -> float:
    """CPU the server has used, its waited-for children (the layer unpackers) included:
    utime + stime + cutime + cstime from /proc/PID/stat, in ms."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) * 1e3 / os.sysconf("SC_CLK_TCK")


def children_cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1e3


def skopeo_umoci(uri: str, scratch: str) -> tuple[float, float]:
    """ms of ``skopeo copy docker://... oci:`` and of ``umoci unpack``, into fresh dirs
    under ``scratch`` (removed after)."""
    host, _, rest = uri.removeprefix("docker://").partition("/")
    repo, _, tag = rest.partition("#")
    layout, bundle = os.path.join(scratch, "layout"), os.path.join(scratch, "bundle")
    os.makedirs(scratch)
    try:
        start = perf_counter()
        skopeo("copy", "--src-tls-verify=false", f"docker://{host}/{repo}:{tag}", f"oci:{layout}:it")
        copied = perf_counter()
        tool("umoci", "unpack", "--image", f"{layout}:it", bundle)
        unpacked = perf_counter()
        if not os.path.isfile(os.path.join(bundle, "rootfs", "payload", "0000")):
            raise RuntimeError("umoci's bundle has no /payload/0000")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return (copied - start) * 1e3, (unpacked - copied) * 1e3


async def _scenario(server: srv.BenchServer, args: argparse.Namespace, prefix: str, live: set[str],
                    series: list[Series]) -> None:
    registry = DockerRegistry(os.path.join(server.base, "registry"))
    try:
        await trio.to_thread.run_sync(registry.start)
        layout = await trio.to_thread.run_sync(build_image, server.base, args.mib, args.files)
        uri = await trio.to_thread.run_sync(registry.push, layout, "bench", "bench")
        zstd_uri = await trio.to_thread.run_sync(registry.push, layout, "bench-zstd", "bench")
        async with gactor.connect(server.url) as client:
            await _pulls(client, server, uri, zstd_uri, args, series)
            await _creates(client, uri, prefix, live, args, series)
    finally:
        await trio.to_thread.run_sync(registry.stop)


async def _pulls(client: Any, server: srv.BenchServer, uri: str, zstd_uri: str, args: argparse.Namespace,
                 series: list[Series]) -> None:
    size = f"{args.mib} MiB in {args.files} files + busybox"
    gactor_pull = Series("pull_first_gactor", f"first pull, gactor ({size})", "ms")
    both = Series("pull_first_skopeo_umoci", "skopeo copy + umoci unpack, same image", "ms")
    copy = Series("pull_skopeo_copy", "  of which skopeo copy", "ms")
    unpack = Series("pull_umoci_unpack", "  of which umoci unpack", "ms")
    zstd_pull = Series("pull_first_gactor_zstd", "first pull, gactor, the same tars as zstd layers", "ms")
    gactor_cpu = Series("pull_cpu_gactor", "CPU of a first pull, gactor (server + unpackers)", "ms")
    tools_cpu = Series("pull_cpu_skopeo_umoci", "CPU of skopeo copy + umoci unpack", "ms")
    zstd_cpu = Series("pull_cpu_gactor_zstd", "CPU of a first pull, gactor, zstd layers", "ms")
    series += [gactor_pull, both, copy, unpack, zstd_pull, gactor_cpu, tools_cpu, zstd_cpu]
    contenders = ["gactor", "tools", "zstd"]
    for n in range(args.pulls):
        for who in contenders[n % 3:] + contenders[:n % 3]:  # each goes first in turn
            if who == "tools":
                cpu = children_cpu_ms()
                ms_copy, ms_unpack = await trio.to_thread.run_sync(skopeo_umoci, uri,
                                                                   os.path.join(server.base, "scratch"))
                tools_cpu.samples.append(children_cpu_ms() - cpu)
                copy.samples.append(ms_copy)
                unpack.samples.append(ms_unpack)
                both.samples.append(ms_copy + ms_unpack)
                continue
            wall, cpu_series = (gactor_pull, gactor_cpu) if who == "gactor" else (zstd_pull, zstd_cpu)
            cpu = server_cpu_ms(server.pid)
            with trio.fail_after(OP_TIMEOUT):
                start = perf_counter()
                info = await client.pull(uri if who == "gactor" else zstd_uri)
                wall.samples.append((perf_counter() - start) * 1e3)
            cpu_series.samples.append(server_cpu_ms(server.pid) - cpu)
            if info.layers != 3:
                raise RuntimeError(f"the pull gave {info.layers} layers, not 3")
            removed = await client.prune_images()
            if len(removed) != 4:  # the image and its three layers: the next pull is a first one
                raise RuntimeError(f"the prune removed {removed}, not the image and 3 layers")
    await client.pull(uri)  # for the creates: cached from here on


async def _creates(client: Any, uri: str, prefix: str, live: set[str], args: argparse.Namespace,
                   series: list[Series]) -> None:
    limit = Limits(disk=DiskLimits(byte_hard=args.disk_mib * MiB, scope=DiskLimitScope.EXCLUSIVE))
    kinds = {
        "create_cached_image": ("create, cached registry image (manifest fetched again)",
                                dict(image=ImageRef(uri=uri))),
        "create_disk_limit": (f"create, same image + disk limit ({args.disk_mib} MiB, exclusive)",
                              dict(image=ImageRef(uri=uri), limits=limit)),
        "create_default_rootfs": ("create, default rootfs directory (baseline)", {}),
    }
    made = {key: Series(key, label, "ms") for key, (label, _) in kinds.items()}
    series += made.values()
    counter = iter(range(1 << 30))
    for round_ in range(args.runs + 1):  # round 0 warms every path up, untimed
        for key, (_, fields) in kinds.items():
            handle = f"{prefix}-{key.removeprefix('create_')}-{next(counter)}"
            live.add(handle)
            with trio.fail_after(OP_TIMEOUT):
                start = perf_counter()
                container = await client.create(ContainerSpec(handle=handle, **fields))
                elapsed = (perf_counter() - start) * 1e3
            limited = (await container.current_disk_limits()).byte_hard
            if limited != (limit.disk.byte_hard if "limits" in fields else 0):
                raise RuntimeError(f"{handle}: disk limit {limited}")
            await client.destroy(handle)
            live.discard(handle)
            if round_:
                made[key].samples.append(elapsed)


def main(argv: list[str] | None = None) -> int:
    if shutil.which("docker-registry") is None or shutil.which("skopeo") is None or shutil.which("umoci") is None:
        print("bench.images: needs docker-registry, skopeo and umoci (scripts/setup.sh)")
        return 2
    return srv.run_scenario("images", _scenario, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
