"""A thin ctypes binding to libnftables: one nft context, whole scripts as one transaction.

In-process instead of exec'ing ``nft -f``: the exec dominated a per-container change
(PERF_NOTES.md). A context is not thread-safe, so calls are serialised by a lock; a
script either applies completely or not at all (the kernel's transaction).

``apply`` coalesces: scripts handed in by other threads while a transaction runs go
together in the next one. Each transaction costs about 0.6 ms whatever it holds
(libnftables fetches the table's chains and sets into its cache first, then the kernel
commits): 50 containers' rules took 27-36 ms one by one and 1.3-4 ms as one.
"""

from __future__ import annotations

import ctypes
import json
import threading
from dataclasses import dataclass
from typing import Any

_NFT_CTX_DEFAULT = 0
_NFT_CTX_OUTPUT_JSON = 1 << 4


class NftError(Exception):
    """libnftables refused a script; the message is its error text."""


@dataclass
class _Script:
    text: str
    done: bool = False
    error: str | None = None


class Nft:
    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
        except OSError as err:
            raise NftError(f"libnftables is not installed (Debian: libnftables1): {err}") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_int
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        self._lib = lib
        self._lock = threading.Lock()  # the context's
        self._queue_lock = threading.Lock()  # ``_queued``'s, only ever taken briefly
        self._queued: list[_Script] = []
        self._ctx = lib.nft_ctx_new(_NFT_CTX_DEFAULT)
        if not self._ctx:
            raise NftError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, script: str, json_output: bool = False) -> str:
        """Apply ``script`` (nft syntax, many commands) as one transaction; its output."""
        with self._lock:
            return self._run_locked(script, json_output)

    def apply(self, script: str) -> None:
        """``run`` for a script whose output nobody reads, coalesced with the scripts
        other threads hand in meanwhile: while one transaction runs, the scripts that
        arrive wait, and the first of them to get the context applies them all as one.
        If that fails, each is applied alone, so every caller gets its own script's
        outcome, exactly as from ``run``: applied, or NftError and nothing of it applied.
        Only for scripts that may run in any order with other callers' (they were
        handed in concurrently)."""
        mine = _Script(script)
        with self._queue_lock:
            self._queued.append(mine)
        with self._lock:
            if not mine.done:
                with self._queue_lock:
                    batch, self._queued = self._queued, []
                self._apply_locked(batch)
        if mine.error is not None:
            raise NftError(mine.error)

    def _apply_locked(self, batch: list[_Script]) -> None:
        if len(batch) > 1:
            try:
                self._run_locked("".join(s.text if s.text.endswith("\n") else s.text + "\n" for s in batch))
            except NftError:
                pass  # one of them is refused: find out which, alone
            else:
                for script in batch:
                    script.done = True
                return
        for script in batch:
            try:
                self._run_locked(script.text)
            except NftError as err:
                script.error = str(err)
            script.done = True

    def _run_locked(self, script: str, json_output: bool = False) -> str:
        lib, ctx = self._lib, self._ctx
        if ctx is None:
            raise NftError("the nft context is closed")
        flags = lib.nft_ctx_output_get_flags(ctx)
        lib.nft_ctx_output_set_flags(ctx, flags | _NFT_CTX_OUTPUT_JSON if json_output
                                     else flags & ~_NFT_CTX_OUTPUT_JSON)
        rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
        output = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
        error = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
        if rc != 0:
            raise NftError(error.strip() or f"nft failed ({rc})")
        return output

    def list_json(self, what: str) -> dict[str, Any]:
        """``list <what>`` as parsed JSON (e.g. ``table ip gactor_1a2b``)."""
        parsed: dict[str, Any] = json.loads(self.run(f"list {what}", json_output=True) or "{}")
        return parsed

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None
