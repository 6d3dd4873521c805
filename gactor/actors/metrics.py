"""Container metrics from the cgroup and the depot, read in a worker thread."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import trio

from ..kernel import depot, disk_limits
from ..kernel.errors import KernelError
from ..types import (
    ContainerCPUStat,
    ContainerDiskStat,
    ContainerMemoryStat,
    ContainerNetworkStat,
    ContainerPidStat,
    Metrics,
)

if TYPE_CHECKING:
    from .container import ContainerRef

_MEMORY_FIELDS = frozenset(ContainerMemoryStat.__dataclass_fields__)


def read(container: ContainerRef) -> Metrics:
    """The container's metrics, read here and now (blocking: call it in a worker thread).
    Raises KernelError when its cgroup is gone (destroyed meanwhile)."""
    cgroup = container.cgroup
    stat = cgroup.memory_stat()
    usage, user, system = cgroup.cpu_stat()
    # A disk-limited container's upper file system keeps counters; others are walked.
    upper_bytes, upper_inodes = (disk_limits.usage(container.dir, container.root)
                                 or depot.disk_usage(os.path.join(container.dir, "upper")))
    age = time.time() - container.created_at
    image_bytes, image_inodes = container.image_usage
    # Garden's entitlement is in shares; on v2 the cgroup holds a converted weight, so use
    # the spec (1024, the kernel's default, when nothing was asked for).
    cpu = container.cpu_limits
    shares = cpu.weight or cpu.limit_in_shares or 1024
    network_stat = None
    if container.net is not None and container.env.network is not None:
        rx, tx = container.env.network.stats(container.net)
        network_stat = ContainerNetworkStat(rx_bytes=rx, tx_bytes=tx)
    return Metrics(
        memory_stat=ContainerMemoryStat(**{k: v for k, v in stat.items() if k in _MEMORY_FIELDS}),
        cpu_stat=ContainerCPUStat(usage=usage, user=user, system=system),
        disk_stat=ContainerDiskStat(
            total_bytes_used=upper_bytes + image_bytes,
            total_inodes_used=upper_inodes + image_inodes,
            exclusive_bytes_used=upper_bytes,
            exclusive_inodes_used=upper_inodes,
        ),
        network_stat=network_stat,
        pid_stat=ContainerPidStat(current=cgroup.pids_current(), max=cgroup.pids_max()),
        age=age,
        cpu_entitlement=int(shares * container.env.entitlement_per_share / 100 * age * 1e9),
    )


async def collect(container: ContainerRef) -> Metrics:
    return await trio.to_thread.run_sync(read, container)


def read_pea(container: ContainerRef, pea: Any) -> Metrics:
    """A pea's metrics (blocking): its own cgroup's when it has one, else its container's;
    disk is what it wrote over its image. Raises KernelError when the cgroup is gone."""
    cgroup = pea.cgroup or container.cgroup
    stat = cgroup.memory_stat()
    usage, user, system = cgroup.cpu_stat()
    upper_bytes, upper_inodes = depot.disk_usage(os.path.join(pea.dir, "upper"))
    return Metrics(
        memory_stat=ContainerMemoryStat(**{k: v for k, v in stat.items() if k in _MEMORY_FIELDS}),
        cpu_stat=ContainerCPUStat(usage=usage, user=user, system=system),
        disk_stat=ContainerDiskStat(exclusive_bytes_used=upper_bytes, exclusive_inodes_used=upper_inodes,
                                    total_bytes_used=upper_bytes, total_inodes_used=upper_inodes),
        pid_stat=ContainerPidStat(current=cgroup.pids_current(), max=cgroup.pids_max()),
    )


def _read_many(containers: list[ContainerRef]) -> list[Metrics | KernelError]:
    results: list[Metrics | KernelError] = []
    for container in containers:
        try:
            results.append(read(container))
        except KernelError as err:  # destroyed meanwhile, say: that handle's entry says so
            results.append(err)
    return results


async def collect_many(containers: list[ContainerRef]) -> list[Metrics | KernelError]:
    """Metrics of many containers in one worker-thread trip: a bulk call over hundreds of
    containers pays for file reads, not for hundreds of thread hand-offs."""
    return await trio.to_thread.run_sync(_read_many, containers)
