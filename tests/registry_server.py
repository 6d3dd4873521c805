"""A tiny registry (distribution v2 API, pull only) for tests, on 127.0.0.1 only, serving
the images of OCI layouts the tests build.

``LocalRegistry(layouts).start()`` serves ``/v2/<repo>/manifests/<tag or digest>`` and
``/v2/<repo>/blobs/<digest>`` (with ``Range``) from ``layouts[repo]``, sending
``Docker-Content-Digest``. Knobs, each for a test to turn: ``auth`` ("", "basic" or
"bearer", with ``users``), ``break_blobs`` (digest -> bytes after which the first
download of it is cut off), ``corrupt_blobs``, ``redirect_blobs`` (blobs answered with a
307 to another path), ``indexes`` (tags answered with an image index of several
platforms), ``hold_blobs`` (an Event: blob downloads wait while it is clear),
``step_blobs`` (digest -> a Semaphore: that blob is sent STEP bytes at a time, each
piece once the test releases the semaphore). ``requests`` records every request's path and Range.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

STEP = 1 << 20  # bytes of a stepped blob sent per release (the size the server reads at a time)
INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class LocalRegistry:
    def __init__(self, layouts: dict[str, str]) -> None:
        self.layouts = layouts
        self.auth = ""
        self.users: dict[str, str] = {}
        self.tokens: set[str] = set()
        self.break_blobs: dict[str, int] = {}
        self.corrupt_blobs: set[str] = set()
        self.redirect_blobs = False
        self.ranges = True  # False: Range headers are ignored (a full 200 every time)
        self.hold_blobs = threading.Event()  # cleared: blob downloads wait until it is set
        self.hold_blobs.set()
        self.step_blobs: dict[str, threading.Semaphore] = {}
        self.indexes: dict[str, list[tuple[str, str]]] = {}  # tag -> [(os/arch, tag it points to)]
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LocalRegistry:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                registry.handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ---- serving ---------------------------------------------------------------------

    def _blob_path(self, repo: str, digest: str) -> str | None:
        layout = self.layouts.get(repo)
        if layout is None or not digest.startswith("sha256:") or "/" in digest:
            return None
        path = os.path.join(layout, "blobs", "sha256", digest.partition(":")[2])
        return path if os.path.isfile(path) else None

    def _manifest_for_tag(self, repo: str, tag: str) -> bytes | None:
        layout = self.layouts.get(repo)
        if layout is None:
            return None
        if tag in self.indexes:
            entries = []
            for platform, target in self.indexes[tag]:
                body = self._manifest_for_tag(repo, target)
                assert body is not None
                os_name, arch = platform.split("/")
                entries.append({"mediaType": MANIFEST, "digest": _digest(body), "size": len(body),
                                "platform": {"os": os_name, "architecture": arch}})
            return json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": entries}).encode()
        with open(os.path.join(layout, "index.json")) as f:
            index = json.load(f)
        for entry in index["manifests"]:
            if (entry.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag:
                path = self._blob_path(repo, entry["digest"])
                assert path is not None
                with open(path, "rb") as blob:
                    return blob.read()
        return None

    def _authorized(self, handler: BaseHTTPRequestHandler) -> bool:
        given = handler.headers.get("Authorization", "")
        if self.auth == "basic":
            return given.startswith("Basic ") and _basic_ok(given, self.users)
        if self.auth == "bearer":
            return given.startswith("Bearer ") and given[7:] in self.tokens
        return True

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path, _, query = h.path.partition("?")
        with self.lock:
            self.requests.append((path, h.headers.get("Range", "")))
        if path == "/token":
            given = h.headers.get("Authorization", "")
            if not _basic_ok(given, self.users):
                return _send(h, 401, b'{"errors": [{"code": "UNAUTHORIZED"}]}')
            token = secrets.token_hex(8)
            self.tokens.add(token)
            return _send(h, 200, json.dumps({"token": token}).encode(), "application/json")
        if path.startswith("/storage/"):
            return self._send_blob(h, path.split("/")[2], path.split("/")[3])
        if not self._authorized(h):
            challenge = ('Basic realm="test"' if self.auth == "basic" else
                         f'Bearer realm="http://{self.host}/token",service="test",scope="repository:x:pull"')
            return _send(h, 401, b'{"errors": [{"code": "UNAUTHORIZED"}]}', extra={"WWW-Authenticate": challenge})
        parts = path.split("/")
        if len(parts) < 5 or parts[1] != "v2":
            return _send(h, 404, b"{}")
        repo, kind, ref = "/".join(parts[2:-2]), parts[-2], parts[-1]
        if kind == "manifests":
            if ref.startswith("sha256:"):
                blob = self._blob_path(repo, ref)
                body = open(blob, "rb").read() if blob else None  # noqa: SIM115
                if body is None and any(ref == _digest(self._manifest_for_tag(repo, t) or b"") for t in self.indexes):
                    body = next(self._manifest_for_tag(repo, t) for t in self.indexes
                                if ref == _digest(self._manifest_for_tag(repo, t) or b""))
            else:
                body = self._manifest_for_tag(repo, ref)
            if body is None:
                return _send(h, 404, b'{"errors": [{"code": "MANIFEST_UNKNOWN"}]}')
            media = json.loads(body).get("mediaType", MANIFEST)
            return _send(h, 200, body, media, extra={"Docker-Content-Digest": _digest(body)})
        if kind == "blobs":
            if self.redirect_blobs:
                return _send(h, 307, b"", extra={"Location": f"/storage/{repo.replace('/', '_')}/{ref}"})
            return self._send_blob(h, repo, ref)
        return _send(h, 404, b"{}")

    def _send_blob(self, h: BaseHTTPRequestHandler, repo: str, digest: str) -> None:
        self.hold_blobs.wait(30)
        path = self._blob_path(repo.replace("_", "/"), digest) or self._blob_path(repo, digest)
        if path is None:
            return _send(h, 404, b'{"errors": [{"code": "BLOB_UNKNOWN"}]}')
        with open(path, "rb") as f:
            data = f.read()
        if digest in self.corrupt_blobs:
            data = data[:-1] + bytes([data[-1] ^ 1])
        start = 0
        ranged = h.headers.get("Range", "")
        if ranged.startswith("bytes=") and self.ranges:
            start = int(ranged[6:].split("-")[0])
        cut = self.break_blobs.pop(digest, None)
        h.send_response(206 if start else 200)
        h.send_header("Content-Length", str(len(data) - start))
        h.send_header("Content-Type", "application/octet-stream")
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if cut is not None:
            h.wfile.write(data[start:start + cut])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        steps = self.step_blobs.get(digest)
        if steps is not None:
            for offset in range(start, len(data), STEP):
                assert steps.acquire(timeout=30), f"blob {digest}: piece at {offset} never released"
                h.wfile.write(data[offset:offset + STEP])
                h.wfile.flush()
            return
        h.wfile.write(data[start:])


def _digest(body: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(body).hexdigest()


def _basic_ok(header: str, users: dict[str, str]) -> bool:
    if not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except ValueError:
        return False
    return users.get(user) == password and bool(user)


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str = "application/json",
          extra: dict[str, str] | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Length", str(len(body)))
    h.send_header("Content-Type", content_type)
    for key, value in (extra or {}).items():
        h.send_header(key, value)
    h.end_headers()
    h.wfile.write(body)
