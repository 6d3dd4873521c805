"""Errors raised by the synchronous kernel layer (``gactor.kernel``).

Every wrapper turns ``OSError`` into a ``KernelError`` that names the operation and the
file or object it touched, so a log line says what failed without a traceback. Actors
translate these into Garden errors at their edge with ``raise ... from``.
"""

from __future__ import annotations

import os
from typing import Self


class KernelError(Exception):
    """A kernel operation failed.

    ``op`` is the wrapper's operation (``"cgroup.create"``), ``errno`` the kernel's error
    number (0 when the failure is ours, not the kernel's), ``detail`` the path or object.
    """

    def __init__(self, op: str, errno: int, detail: str) -> None:
        super().__init__(op, errno, detail)
        self.op = op
        self.errno = errno
        self.detail = detail

    def __str__(self) -> str:
        reason = os.strerror(self.errno) if self.errno else "failed"
        return f"{self.op}: {reason}: {self.detail}"

    @classmethod
    def from_os_error(cls, op: str, err: OSError, detail: str) -> Self:
        """Wrap ``err``; use as ``raise KernelError.from_os_error(...) from err``."""
        return cls(op, err.errno or 0, detail)


class CgroupError(KernelError):
    """A cgroup file, directory or hierarchy could not be used."""
