"""The seccomp program against the real kernel: each check runs in a forked child that
loads the program and reports the errno of raw syscalls (ctypes ``syscall``), so the
answer is the kernel's, not libseccomp's idea of it."""

from __future__ import annotations

import ctypes
import errno
import os
import struct

import pytest

from gactor.kernel import seccomp

from .forked import in_child

pytestmark = pytest.mark.kernel

_libc = ctypes.CDLL(None, use_errno=True)
NR = {
    "unshare": 272,
    "setns": 308,
    "mount": 165,
    "clone": 56,
    "clone3": 435,
    "personality": 135,
    "io_uring_setup": 425,
    "faccessat2": 439,
    "close_range": 436,
    "keyctl": 250,
    "bpf": 321,
    "getpid": 39,
    "openat2": 437,
    "pidfd_open": 434,
    "fchmodat2": 452,
}
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWCGROUP, SIGCHLD = 0x10000000, 0x00020000, 0x02000000, 17


@pytest.fixture(scope="module")
def program() -> seccomp.Program:
    return seccomp.build()


def _syscall(nr: int, *args: int) -> int:
    """0 on success, else the errno. A clone that succeeds ends its child at once."""
    rc = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    if rc == 0 and nr == NR["clone"]:
        os._exit(0)
    return 0 if rc >= 0 else ctypes.get_errno()


def confined(program: seccomp.Program, calls: list[tuple[int, ...]]) -> list[int]:
    """Load ``program`` in a forked child, make each raw call there; their results."""

    def child() -> list[int]:
        program.load()
        return [_syscall(nr, *args) for nr, *args in calls]

    return list(in_child(child))


def test_namespace_and_mount_calls_get_eperm(program):
    results = confined(
        program,
        [
            (NR["unshare"], CLONE_NEWUSER),
            (NR["unshare"], CLONE_NEWNS),
            (NR["setns"], 0, 0),
            (NR["mount"], 0, 0, 0, 0, 0),
            (NR["keyctl"], 0),
            (NR["bpf"], 0, 0, 0),
        ],
    )
    assert results == [errno.EPERM] * 6


def test_clone_with_namespace_flags_is_refused(program):
    results = confined(
        program,
        [
            (NR["clone"], CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0),
            (NR["clone"], CLONE_NEWCGROUP | SIGCHLD, 0, 0, 0, 0),
        ],
    )
    assert results == [errno.EPERM, errno.EPERM]


def test_syscalls_newer_than_the_profile_get_enosys(program):
    # clone3 (so glibc falls back to clone), io_uring, pidfd_open, fchmodat2, and numbers
    # no kernel has assigned yet.
    results = confined(
        program,
        [
            (NR["clone3"], 0, 0),
            (NR["io_uring_setup"], 0, 0),
            (NR["pidfd_open"], 0, 0),
            (NR["fchmodat2"], 0, 0, 0, 0),
            (470,),
            (511,),
        ],
    )
    assert results == [errno.ENOSYS] * 6


def test_the_newer_calls_the_profile_allows_reach_the_kernel(program):
    # EFAULT / EINVAL: the kernel itself looked at the (bad) arguments.
    results = confined(
        program,
        [
            (NR["faccessat2"], -100, 0, 0, 0),
            (NR["openat2"], -100, 0, 0, 0),
            (NR["close_range"], 1 << 30, 1 << 30, 0),
            (NR["getpid"],),
        ],
    )
    assert results == [errno.EFAULT, errno.EINVAL, 0, 0]  # openat2: size 0


def test_personality_is_limited_to_linux_linux32_and_the_query(program):
    results = confined(
        program,
        [
            (NR["personality"], 0xFFFFFFFF),
            (NR["personality"], 0x0008),
            (NR["personality"], 0x0000),
            (NR["personality"], 0x0020000),
            (NR["personality"], 0x0400000),
        ],
    )
    assert results == [0, 0, 0, errno.EPERM, errno.EPERM]


def test_fork_and_exec_work_and_the_filter_is_inherited(program):
    pid = os.fork()
    if pid == 0:
        try:
            program.load()
            os.execv(
                "/bin/sh",
                [
                    "sh",
                    "-c",
                    "grep -q '^Seccomp:.2' /proc/self/status && ! unshare -U true 2>/dev/null",
                ],
            )
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_stub_falls_through_for_other_architectures_and_old_syscalls():
    stub = seccomp.enosys_stub({"x86_64": {437}, "x86": set()})
    insns = [struct.unpack("HBBI", stub[i : i + 8]) for i in range(0, len(stub), 8)]
    # Every jump lands inside the stub or exactly at its end (the libseccomp program).
    for i, (code, jt, jf, _) in enumerate(insns):
        if code & 0x07 == 0x05 and code != 0x05:
            assert i + 1 + jt <= len(insns)
            assert i + 1 + jf <= len(insns)
    rets = [k for code, _, _, k in insns if code == 0x06]
    assert rets == [seccomp.errno_action(errno.ENOSYS)] * 2


def test_loading_without_privilege_or_no_new_privs_is_refused(program):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setresuid(65534, 65534, 65534)  # drops CAP_SYS_ADMIN
            try:
                program.load()
                os.write(w, b"loaded")
            except seccomp.SeccompError as err:
                os.write(w, str(err.errno).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        assert f.read() == str(errno.EACCES).encode()
    os.waitpid(pid, 0)


def test_the_program_is_small_enough_and_knows_every_name(program):
    assert program.unknown == frozenset()
    assert 0 < program.instructions <= 4096
