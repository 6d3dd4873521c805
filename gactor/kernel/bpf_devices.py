"""Device control on cgroup v2: a BPF_PROG_TYPE_CGROUP_DEVICE program per container.

cgroup v2 has no ``devices.allow``; the kernel asks the eBPF programs attached to a
cgroup (and its ancestors) instead, for every mknod and every open of a device node. This
module turns the allowlist ``cgroups.Cgroup.setup_devices`` takes (``"c 1:3 rwm"``,
``"b *:* m"``, ...) into such a program, hand-assembled (a dozen instructions a rule, the
shape runc's devicefilter generates), loads it with ``bpf(BPF_PROG_LOAD)`` and attaches it
with ``bpf(BPF_PROG_ATTACH)`` to the cgroup directory. Anything no rule allows is denied.

The program stays attached until the cgroup is removed; the fds used here are closed
before returning. ``BPF_F_ALLOW_MULTI`` lets a nested runtime attach programs of its own
below, and the kernel runs ours as well, so a container can only narrow its devices.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
from dataclasses import dataclass

from .errors import CgroupError

_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD, _BPF_PROG_ATTACH = 5, 8
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6
_BPF_F_ALLOW_MULTI = 2

# struct bpf_cgroup_dev_ctx: access_type (type | access << 16), major, minor.
_DEV_BLOCK, _DEV_CHAR = 1, 2
_ACC = {"m": 1, "r": 2, "w": 4}

# eBPF opcodes (linux/bpf.h).
_LDX_W = 0x61  # dst = *(u32 *)(src + off)
_AND_K, _RSH_K, _MOV_X, _MOV_K = 0x57, 0x77, 0xBF, 0xB7
_JNE_K, _JNE_X, _EXIT = 0x55, 0x5D, 0x95

_RULE = re.compile(r"^([abc]) (\*|\d+):(\*|\d+) ([rwm]+)$")
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Rule:
    """One allow rule: device type ("a" any, "b", "c"), major/minor (None: any), access."""

    kind: str
    major: int | None
    minor: int | None
    access: str

    @classmethod
    def parse(cls, text: str) -> Rule:
        m = _RULE.match(text)
        if m is None:
            raise ValueError(
                f"bad device rule {text!r}: want 'TYPE MAJOR:MINOR ACCESS', e.g. 'c 1:3 rwm'"
            )
        kind, major, minor, access = m.groups()
        return cls(
            kind, None if major == "*" else int(major), None if minor == "*" else int(minor), access
        )


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def assemble(rules: list[str]) -> bytes:
    """The program for ``rules`` (allow rules; everything else is denied). Raises ValueError."""
    # r2 = type, r3 = requested access, r4 = major, r5 = minor; r1 is free after the loads.
    head = [
        _insn(_LDX_W, 2, 1, 0),
        _insn(_AND_K, 2, imm=0xFFFF),
        _insn(_LDX_W, 3, 1, 0),
        _insn(_RSH_K, 3, imm=16),
        _insn(_LDX_W, 4, 1, 4),
        _insn(_LDX_W, 5, 1, 8),
    ]
    body: list[bytes] = []
    for rule in map(Rule.parse, rules):
        checks: list[tuple[int, int, int, int]] = []  # (code, dst, src, imm) each "skip if"
        if rule.kind != "a":
            checks.append((_JNE_K, 2, 0, _DEV_BLOCK if rule.kind == "b" else _DEV_CHAR))
        allowed = sum(_ACC[a] for a in set(rule.access))
        pre: list[bytes] = []
        if allowed != 7:
            # Allowed only when every requested bit is in the rule: (r3 & allowed) == r3.
            pre = [_insn(_MOV_X, 1, 3), _insn(_AND_K, 1, imm=allowed)]
            checks.append((_JNE_X, 1, 3, 0))
        if rule.major is not None:
            checks.append((_JNE_K, 4, 0, rule.major))
        if rule.minor is not None:
            checks.append((_JNE_K, 5, 0, rule.minor))
        # Each failed check jumps past the rule's "return 1" (2 instructions).
        block = list(pre)
        for i, (code, dst, src, imm) in enumerate(checks):
            remaining = len(checks) - i - 1
            block.append(_insn(code, dst, src, off=remaining + 2, imm=imm))
        block += [_insn(_MOV_K, 0, imm=1), _insn(_EXIT)]
        body += block
    tail = [_insn(_MOV_K, 0, imm=0), _insn(_EXIT)]
    return b"".join(head + body + tail)


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, len(attr))
    rc = _libc.syscall(ctypes.c_long(_SYS_BPF), ctypes.c_long(cmd), buf, ctypes.c_uint(len(attr)))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(rc)


def load(rules: list[str]) -> int:
    """Load the program for ``rules``; returns its fd (the caller closes it). Raises
    CgroupError (EPERM without CAP_BPF/CAP_SYS_ADMIN) or ValueError for a bad rule."""
    code = assemble(rules)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"Apache-2.0")
    log = ctypes.create_string_buffer(1 << 16)
    attr = struct.pack(
        "<IIQQIIQII16sII",
        _BPF_PROG_TYPE_CGROUP_DEVICE,
        len(code) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
        1,
        len(log),
        ctypes.addressof(log),
        0,
        0,
        b"gactor_devices",
        0,
        _BPF_CGROUP_DEVICE,
    )
    try:
        return _bpf(_BPF_PROG_LOAD, attr)
    except OSError as err:
        detail = log.value.decode(errors="replace").strip()[-500:]
        raise CgroupError("bpf.prog_load", err.errno or 0, f"device program: {detail}") from err


def attach(cgroup_dir: str, rules: list[str]) -> None:
    """Deny every device to the processes of ``cgroup_dir`` (a cgroup v2 directory) but
    those ``rules`` allow. Raises CgroupError (ValueError for a bad rule)."""
    prog = load(rules)
    try:
        try:
            target = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise CgroupError.from_os_error("bpf.prog_attach", err, cgroup_dir) from err
        try:
            _bpf(
                _BPF_PROG_ATTACH,
                struct.pack("<IIIII", target, prog, _BPF_CGROUP_DEVICE, _BPF_F_ALLOW_MULTI, 0),
            )
        except OSError as err:
            raise CgroupError("bpf.prog_attach", err.errno or errno.EINVAL, cgroup_dir) from err
        finally:
            os.close(target)
    finally:
        os.close(prog)
