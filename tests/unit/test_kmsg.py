"""Parsing the kernel log's OOM kill records."""

from __future__ import annotations

import os

from gactor.kernel import kmsg

RECORD = (b"6,3021,1977169025,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,"
          b"mems_allowed=0,oom_memcg=/gactor-1a2b/web-1,task_memcg=/gactor-1a2b/web-1/sub,task=dd,"
          b"pid=4242,uid=1000\n")


def test_an_oom_kill_record_names_the_cgroup_task_and_pid() -> None:
    kill = kmsg.parse(RECORD)
    assert kill == kmsg.OomKill("/gactor-1a2b/web-1", "dd", 4242)
    assert kill.cgroup_name == "web-1"


def test_other_records_are_not_oom_kills() -> None:
    assert kmsg.parse(b"6,3022,1977169100,-;Memory cgroup out of memory: Killed process 4242 (dd)\n") is None
    assert kmsg.parse(b"4,1,2,-;oom-kill:constraint=CONSTRAINT_MEMCG,task=dd\n") is None  # no pid
    assert kmsg.parse(b"6,1,2,-;eth0: link up\n") is None


def test_the_reader_reports_records_written_after_it_opened() -> None:
    """Against the real /dev/kmsg (root): a record written before the open is skipped,
    one written after it is read."""
    mark = os.urandom(4).hex()
    with open(kmsg.KMSG, "w") as log:
        log.write(f"<6>gactor test_kmsg before {mark}\n")
    reader = kmsg.KernelLog()
    try:
        with open(kmsg.KMSG, "w") as log:
            log.write(f"<6>gactor test_kmsg after {mark}\n")
        seen = b"".join(reader.read())
    finally:
        reader.close()
    assert f"after {mark}".encode() in seen
    assert f"before {mark}".encode() not in seen
