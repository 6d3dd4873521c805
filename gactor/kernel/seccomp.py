"""The seccomp allowlist of unprivileged containers: built once, loaded per process.

``build()`` compiles Garden's allowlist (SECURITY_BASELINE.md, Appendix A) with
libseccomp (ctypes over ``libseccomp.so.2``, which the base image has) for x86_64, x86
and x32, and prepends a small hand-written stub, so the result is one classic BPF
program held in memory. The server builds it before it forks the spawner; every shim
inherits it, and a process about to exec only hands it to the kernel with one
``prctl(PR_SET_SECCOMP)`` (``Program.load``): no libseccomp call and no allocation in
the child.

The policy:

- allowed: Garden's 314 names, plus ``faccessat2 close_range epoll_pwait2 rseq``
  (modern libcs call them; each only does what an allowed older call does);
- ``clone`` only without namespace flags (Docker's mask ``0x7E020000``, which adds
  CLONE_NEWCGROUP to Garden's ``0x7C020000``); ``personality`` only for 0, 8
  (PER_LINUX32) and 0xffffffff (the query);
- ``ENOSYS`` for every syscall newer than the profile (numbers from 424 on x86_64 and
  x32, from 403 on x86, the first numbers the profile's era did not know), so a libc
  falls back to the older call it has (``clone3`` becomes ``clone``); libseccomp
  cannot say "every number above N", hence the stub (runc does the same);
- ``EPERM`` for everything else (``mount unshare setns bpf keyctl ...``);
- any other architecture: the process is killed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass, field

from .errors import KernelError

GARDEN_ALLOWED = frozenset(
    """
accept accept4 access alarm bind brk capget capset chdir chmod chown chown32 clock_getres
clock_gettime clock_nanosleep close connect copy_file_range creat dup dup2 dup3 epoll_create
epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_wait epoll_wait_old eventfd eventfd2
execve execveat exit exit_group faccessat fadvise64 fadvise64_64 fallocate fanotify_mark
fchdir fchmod fchmodat fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr flistxattr
flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync ftruncate
ftruncate64 futex futimesat getcpu getcwd getdents getdents64 getegid getegid32 geteuid
geteuid32 getgid getgid32 getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid
getppid getpriority getrandom getresgid getresgid32 getresuid getresuid32 getrlimit
get_robust_list getrusage getsid getsockname getsockopt get_thread_area gettid gettimeofday
getuid getuid32 getxattr inotify_add_watch inotify_init inotify_init1 inotify_rm_watch
io_cancel ioctl io_destroy io_getevents ioprio_get ioprio_set io_setup io_submit ipc kill
lchown lchown32 lgetxattr link linkat listen listxattr llistxattr _llseek lremovexattr lseek
lsetxattr lstat lstat64 madvise memfd_create mincore mkdir mkdirat mknod mknodat mlock
mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open mq_timedreceive
mq_timedsend mq_unlink mremap msgctl msgget msgrcv msgsnd msync munlock munlockall munmap
nanosleep newfstatat _newselect open openat openat2 pause pipe pipe2 poll ppoll prctl
pread64 preadv preadv2 prlimit64 pselect6 pwrite64 pwritev pwritev2 read readahead readlink
readlinkat readv recv recvfrom recvmmsg recvmsg remap_file_pages removexattr rename
renameat renameat2 restart_syscall rmdir rt_sigaction rt_sigpending rt_sigprocmask
rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo
sched_getaffinity sched_getattr sched_getparam sched_get_priority_max
sched_get_priority_min sched_getscheduler sched_rr_get_interval sched_setaffinity
sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select semctl semget
semop semtimedop send sendfile sendfile64 sendmmsg sendmsg sendto setfsgid setfsgid32
setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid setpriority
setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid setreuid32
setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid setuid32
setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 sigreturn socket
socketcall socketpair splice stat stat64 statfs statfs64 statx symlink symlinkat sync
sync_file_range syncfs sysinfo syslog tee tgkill time timer_create timer_delete
timerfd_create timerfd_gettime timerfd_settime timer_getoverrun timer_gettime timer_settime
times tkill truncate truncate64 ugetrlimit umask uname unlink unlinkat utime utimensat
utimes vfork vmsplice wait4 waitid waitpid write writev arch_prctl modify_ldt chroot ptrace
""".split()
)
# Beyond Garden: what glibc >= 2.33 and musl call first. Each is an allowed older call
# with a better interface, so allowing it gives a process nothing new.
EXTRA_ALLOWED = frozenset({"faccessat2", "close_range", "epoll_pwait2", "rseq"})
ALLOWED = GARDEN_ALLOWED | EXTRA_ALLOWED
PERSONALITY_ALLOWED = (0x0, 0x8, 0xFFFFFFFF)
CLONE_NAMESPACE_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET

# The first syscall number the profile's era did not know (ENOSYS from here on); since
# Linux 5.1 new syscalls get the same number (424 on) on every architecture, and x86
# numbers 403-423 are its 64-bit-time variants (glibc falls back from those too).
FIRST_NEW_SYSCALL = {"x86_64": 424, "x86": 403}
_X32_BIT = 0x40000000
_X32_FIRST_COMPAT = 512  # x32's own numbers (512-547) are old calls, not new ones

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
_SCMP_ARCH_X32 = 0x4000003E
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_KILL_PROCESS = 0x80000000
_SCMP_FLTATR_ACT_BADARCH = 2
_SCMP_FLTATR_CTL_OPTIMIZE = 8
_SCMP_CMP_EQ = 4
_SCMP_CMP_MASKED_EQ = 7
_SECCOMP_RET_ERRNO = 0x00050000

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

# Classic BPF opcodes (linux/filter.h), and struct seccomp_data's offsets.
_LD_W_ABS, _ALU_AND_K, _JMP_JA = 0x20, 0x54, 0x05
_JMP_JEQ_K, _JMP_JGE_K, _RET_K = 0x15, 0x35, 0x06
_NR, _ARCH = 0, 4


def errno_action(err: int) -> int:
    return _SECCOMP_RET_ERRNO | (err & 0xFFFF)


class SeccompError(KernelError):
    """libseccomp refused the profile or the kernel refused the program."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass(frozen=True)
class Program:
    """A classic BPF seccomp program and a ``sock_fprog`` pointing at it, ready for the
    kernel. Build it before forking; children only call ``load``."""

    code: bytes
    unknown: frozenset[str] = frozenset()  # allowlist names this libseccomp does not know
    _buffer: ctypes.Array[ctypes.c_char] = field(init=False, repr=False, compare=False)
    _fprog: _Fprog = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        buffer = ctypes.create_string_buffer(self.code, len(self.code))
        object.__setattr__(self, "_buffer", buffer)
        object.__setattr__(self, "_fprog", _Fprog(len(self.code) // 8, ctypes.addressof(buffer)))

    @property
    def instructions(self) -> int:
        return len(self.code) // 8

    def load(self) -> None:
        """Confine the calling thread (and all it forks and execs) for good. Needs
        no_new_privs or CAP_SYS_ADMIN in the caller's user namespace (EACCES otherwise).
        Raises SeccompError."""
        if _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(self._fprog), 0, 0) != 0:
            err = ctypes.get_errno()
            raise SeccompError("seccomp.load", err, os.strerror(err))


def _insn(code: int, jt: int = 0, jf: int = 0, k: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def enosys_stub(allowed_new: dict[str, set[int]]) -> bytes:
    """BPF that answers ENOSYS for syscalls from FIRST_NEW_SYSCALL on (unless their
    number is in ``allowed_new[arch]``) and falls through to the next instruction (the
    libseccomp program) for everything else. Jumps are relative, so prepending keeps the
    program after it intact."""
    # (label, opcode, jump-if-true label, jump-if-false label, k); None = next instruction.
    x64_allowed = sorted(allowed_new.get("x86_64", ()))
    x86_allowed = sorted(allowed_new.get("x86", ()))
    prog: list[tuple[str | None, int, str | None, str | None, int]] = [
        (None, _LD_W_ABS, None, None, _ARCH),
        (None, _JMP_JEQ_K, "x64", None, AUDIT_ARCH_X86_64),
        (None, _JMP_JEQ_K, "x86", "orig", AUDIT_ARCH_I386),
        ("x64", _LD_W_ABS, None, None, _NR),
        (None, _ALU_AND_K, None, None, 0xFFFFFFFF & ~_X32_BIT),
        (None, _JMP_JGE_K, None, "orig", FIRST_NEW_SYSCALL["x86_64"]),
        (None, _JMP_JGE_K, "orig", None, _X32_FIRST_COMPAT),
        *[(None, _JMP_JEQ_K, "orig", None, nr) for nr in x64_allowed],
        (None, _RET_K, None, None, errno_action(errno.ENOSYS)),
        ("x86", _LD_W_ABS, None, None, _NR),
        (None, _JMP_JGE_K, None, "orig", FIRST_NEW_SYSCALL["x86"]),
        *[(None, _JMP_JEQ_K, "orig", None, nr) for nr in x86_allowed],
        (None, _RET_K, None, None, errno_action(errno.ENOSYS)),
    ]
    where = {label: i for i, (label, *_rest) in enumerate(prog) if label}
    where["orig"] = len(prog)
    out = bytearray()
    for i, (_label, code, jt, jf, k) in enumerate(prog):
        offset = {lbl: where[lbl] - i - 1 for lbl in (jt, jf) if lbl}
        out += _insn(code, offset.get(jt, 0) if jt else 0, offset.get(jf, 0) if jf else 0, k)
    return bytes(out)


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as err:
        raise SeccompError("seccomp.build", errno.ENOENT, f"cannot load {name}: {err}") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _ok(rc: int, what: str) -> None:
    if rc < 0:
        raise SeccompError("seccomp.build", -rc, f"{what}: {os.strerror(-rc)}")


def build(allowed: frozenset[str] = ALLOWED) -> Program:
    """The profile as one BPF program (module docstring). Raises SeccompError when
    libseccomp is missing or refuses a rule. Names libseccomp does not know (an older
    libseccomp than the kernel) are left out and listed in ``Program.unknown``."""
    lib = _lib()
    ctx = lib.seccomp_init(errno_action(errno.EPERM))
    if not ctx:
        raise SeccompError("seccomp.build", errno.ENOMEM, "seccomp_init failed")
    try:
        for arch in (AUDIT_ARCH_I386, _SCMP_ARCH_X32):
            _ok(lib.seccomp_arch_add(ctx, arch), f"adding architecture {arch:#x}")
        _ok(
            lib.seccomp_attr_set(ctx, _SCMP_FLTATR_ACT_BADARCH, _SCMP_ACT_KILL_PROCESS),
            "bad-arch action",
        )
        # A binary tree of syscall numbers: about log2(n) comparisons per call, not n.
        _ok(lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_OPTIMIZE, 2), "optimize")
        unknown = set()
        for name in sorted(allowed):
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == -1:  # __NR_SCMP_ERROR
                unknown.add(name)
                continue
            _ok(lib.seccomp_rule_add_array(ctx, _SCMP_ACT_ALLOW, nr, 0, None), f"allowing {name}")
        clone = lib.seccomp_syscall_resolve_name(b"clone")
        mask = (_ArgCmp * 1)(_ArgCmp(0, _SCMP_CMP_MASKED_EQ, CLONE_NAMESPACE_FLAGS, 0))
        _ok(lib.seccomp_rule_add_array(ctx, _SCMP_ACT_ALLOW, clone, 1, mask), "allowing clone")
        personality = lib.seccomp_syscall_resolve_name(b"personality")
        for persona in PERSONALITY_ALLOWED:
            arg = (_ArgCmp * 1)(_ArgCmp(0, _SCMP_CMP_EQ, persona, 0))
            _ok(
                lib.seccomp_rule_add_array(ctx, _SCMP_ACT_ALLOW, personality, 1, arg),
                "allowing personality",
            )
        fd = os.memfd_create("gactor-seccomp", os.MFD_CLOEXEC)
        try:
            _ok(lib.seccomp_export_bpf(ctx, fd), "exporting the program")
            body = os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
        allowed_new: dict[str, set[int]] = {}
        for arch_name, token in (("x86_64", AUDIT_ARCH_X86_64), ("x86", AUDIT_ARCH_I386)):
            numbers = {
                lib.seccomp_syscall_resolve_name_arch(token, n.encode()) for n in allowed - unknown
            }
            allowed_new[arch_name] = {nr for nr in numbers if nr >= FIRST_NEW_SYSCALL[arch_name]}
    finally:
        lib.seccomp_release(ctx)
    code = enosys_stub(allowed_new) + body
    if len(code) // 8 > 4096:  # BPF_MAXINSNS
        raise SeccompError("seccomp.build", errno.E2BIG, f"{len(code) // 8} instructions")
    return Program(code, frozenset(unknown))
