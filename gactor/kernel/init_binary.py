"""Building the static ``garden-init`` binary (see garden_init.c) once per source version."""

from __future__ import annotations

import hashlib
import os
import subprocess
from importlib import resources

SOURCE = "garden_init.c"


def ensure(store: str) -> str:
    """Path of the compiled init in ``store``, compiling it if needed.

    Raises OSError or subprocess.CalledProcessError when no C compiler (with a static
    libc) is available; the caller then falls back to a Python init.
    """
    source = resources.files(__package__).joinpath(SOURCE).read_bytes()
    path = os.path.join(store, f"garden-init-{hashlib.sha256(source).hexdigest()[:12]}")
    if os.path.exists(path):
        return path
    os.makedirs(store, mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    subprocess.run(["cc", "-static", "-Os", "-s", "-x", "c", "-o", tmp, "-"], input=source,
                   check=True, capture_output=True, timeout=60)
    os.chmod(tmp, 0o755)
    os.rename(tmp, path)
    return path
