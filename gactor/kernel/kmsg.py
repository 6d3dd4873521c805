"""Which process the kernel's OOM killer took, from the kernel log (``/dev/kmsg``).

cgroup files only count OOM kills (v1 ``memory.oom_control``, v2 ``memory.events``); the
victim is named only in the kernel's log, one record per kill, for example::

    6,3021,1977169,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,
    mems_allowed=0,oom_memcg=/gactor-1a2b/web-1,task_memcg=/gactor-1a2b/web-1,task=dd,
    pid=4242,uid=1000

(one line). ``pid`` is in the host's pid namespace, like the pids the shims report;
``oom_memcg`` is the cgroup whose limit was hit, relative to its hierarchy's root.
A reader opened here starts at the end of the log: it reports kills from now on.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

KMSG = "/dev/kmsg"
_OOM_KILL = re.compile(rb";oom-kill:(?P<fields>[^\n]*)")


@dataclass(frozen=True)
class OomKill:
    memcg: str  # the cgroup whose limit was hit, e.g. "/gactor-1a2b/web-1"
    task: str  # the victim's command name
    pid: int  # host pid namespace

    @property
    def cgroup_name(self) -> str:
        """The last component of ``memcg``: the container's cgroup name."""
        return self.memcg.rstrip("/").rsplit("/", 1)[-1]


def parse(record: bytes) -> OomKill | None:
    """The OOM kill one ``/dev/kmsg`` record reports, or None for any other record."""
    match = _OOM_KILL.search(record)
    if match is None:
        return None
    fields = dict(part.split(b"=", 1) for part in match["fields"].split(b",") if b"=" in part)
    try:
        return OomKill(fields[b"oom_memcg"].decode(errors="replace"),
                       fields[b"task"].decode(errors="replace"), int(fields[b"pid"]))
    except (KeyError, ValueError):
        return None


class KernelLog:
    """A non-blocking reader of ``/dev/kmsg`` from its current end (wait for ``fd`` to be
    readable, then ``read``). Root only; raises OSError when the log cannot be opened."""

    def __init__(self, path: str = KMSG) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.lseek(self.fd, 0, os.SEEK_END)

    def read(self) -> list[bytes]:
        """The records written since the last read (each read of /dev/kmsg is one record)."""
        records = []
        while True:
            try:
                records.append(os.read(self.fd, 8192))
            except BlockingIOError:
                return records
            except OSError as err:
                if err.errno != errno.EPIPE:  # EPIPE: records were overwritten before we read them
                    raise

    def close(self) -> None:
        os.close(self.fd)
