"""``docker://[HOST[:PORT]]/REPO[#TAG]``: images from a registry (distribution v2 API).

Synchronous (a worker thread runs it), on the standard library's ``http.client``: the
manifest is resolved (an OCI index or Docker manifest list is followed to its
linux/amd64 entry), the config fetched, and each layer becomes a ``Blob`` that the layer
store streams (and checks against its digest) only if it does not have it yet.

- Auth: a 401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` fetches a
  token from the realm (with the image's username/password as basic auth, if given);
  ``Basic`` uses the username/password directly.
- Every JSON document is checked against its digest (a manifest fetched by tag against
  the registry's ``Docker-Content-Digest``, when sent); layers while they stream.
- Every step (connect, each read) has a timeout (``STEP_TIMEOUT``); a layer download
  that breaks off is resumed with a ``Range`` request, up to ``RETRIES`` times; other
  requests are retried from the start. Redirects (blob storage) are followed.
- Hosts: ``localhost`` and loopback addresses are spoken to over plain http, everything
  else over https. No host means Docker Hub (``registry-1.docker.io``).

Every failure raises ``ImageError`` naming the image.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import http.client
import ipaddress
import json
import logging
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .layers import Blob, check_digest
from .oci import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_JSON,
    ImageError,
    Resolved,
    from_manifest,
    pick_platform,
)

log = logging.getLogger("gactor.images")

STEP_TIMEOUT = 30.0  # seconds for a connect or one read
RETRIES = 3
MAX_REDIRECTS = 5
CHUNK = 1 << 20
DOCKER_HUB = "registry-1.docker.io"
ACCEPT = ", ".join((*INDEX_TYPES, *MANIFEST_TYPES))


@dataclass(frozen=True)
class Reference:
    host: str  # HOST[:PORT]
    repo: str
    tag: str  # a tag or a sha256:... digest

    @property
    def secure(self) -> bool:
        hostname = urllib.parse.urlsplit(f"//{self.host}").hostname or ""
        if hostname == "localhost":
            return False
        try:
            return not ipaddress.ip_address(hostname).is_loopback
        except ValueError:
            return True


def parse(uri: str) -> Reference:
    """The registry, repository and tag of ``docker://[HOST[:PORT]]/REPO[#TAG]``."""
    if not uri.startswith("docker://"):
        raise ImageError(f"image {uri!r}: not a docker:// URI")
    rest, _, tag = uri[len("docker://"):].partition("#")
    host, _, repo = rest.partition("/")
    if not repo:
        raise ImageError(f"image {uri!r}: no repository (docker://[HOST[:PORT]]/REPO[#TAG])")
    if not host:
        host = DOCKER_HUB
        if "/" not in repo:
            repo = f"library/{repo}"
    if any(not part or part in (".", "..") for part in repo.split("/")):
        raise ImageError(f"image {uri!r}: bad repository name {repo!r}")
    return Reference(host, repo, tag or "latest")


@dataclass
class _Session:
    ref: Reference
    uri: str
    username: str = ""
    password: str = ""
    auth: str = ""  # the Authorization header once known
    tried: set[str] = field(default_factory=set)

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if scheme == "https":
            return http.client.HTTPSConnection(netloc, timeout=STEP_TIMEOUT)
        return http.client.HTTPConnection(netloc, timeout=STEP_TIMEOUT)

    def _url(self, path: str) -> str:
        return f"{'https' if self.ref.secure else 'http'}://{self.ref.host}{path}"

    def open(self, path: str, accept: str = "", start: int = 0) -> tuple[http.client.HTTPConnection,
                                                                          http.client.HTTPResponse]:
        """A response with status 200 (206 for a ``start`` > 0 the server honoured),
        following redirects and answering auth challenges; the caller closes the
        connection. Raises ImageError."""
        url = self._url(path)
        for _ in range(MAX_REDIRECTS + 2):
            parts = urllib.parse.urlsplit(url)
            conn = self._connection(parts.scheme, parts.netloc)
            headers = {"User-Agent": "gactor"}
            if accept:
                headers["Accept"] = accept
            if start:
                headers["Range"] = f"bytes={start}-"
            same_host = parts.netloc == self.ref.host
            if self.auth and same_host:
                headers["Authorization"] = self.auth
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                raise _Transient(f"{url}: {err}") from err
            if response.status in (200, 206):
                return conn, response
            body = response.read(4096)
            conn.close()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location", ""))
                continue
            if response.status == 401 and same_host and self._authenticate(response.getheader("WWW-Authenticate", "")):
                continue
            if response.status >= 500 or response.status == 429:
                raise _Transient(f"{url}: HTTP {response.status}")
            raise ImageError(f"image {self.uri!r}: {url}: HTTP {response.status} "
                             f"{body.decode(errors='replace').strip()[:200]}", errno.ENOENT if response.status == 404
                             else errno.EACCES if response.status in (401, 403) else errno.EIO)
        raise ImageError(f"image {self.uri!r}: {url}: too many redirects or auth rounds")

    def _authenticate(self, challenge: str) -> bool:
        """Set ``auth`` from a 401's challenge; False if there is nothing new to try."""
        scheme, _, params = challenge.partition(" ")
        if challenge in self.tried:
            return False
        self.tried.add(challenge)
        if scheme.lower() == "basic":
            if not self.username:
                raise ImageError(f"image {self.uri!r}: the registry wants a username and password", errno.EACCES)
            self.auth = "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            return True
        if scheme.lower() != "bearer":
            return False
        fields = dict(_challenge_params(params))
        realm = fields.pop("realm", "")
        if not realm:
            return False
        query = urllib.parse.urlencode({k: v for k, v in fields.items() if k in ("service", "scope")}
                                       or {"scope": f"repository:{self.ref.repo}:pull"})
        url = f"{realm}{'&' if '?' in realm else '?'}{query}"
        parts = urllib.parse.urlsplit(url)
        conn = self._connection(parts.scheme, parts.netloc)
        headers = {"User-Agent": "gactor"}
        if self.username:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        try:
            conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
            response = conn.getresponse()
            body = response.read(MAX_JSON)
        except (OSError, http.client.HTTPException) as err:
            raise _Transient(f"token from {realm}: {err}") from err
        finally:
            conn.close()
        if response.status != 200:
            raise ImageError(f"image {self.uri!r}: the token service {realm} answered HTTP {response.status}",
                             errno.EACCES)
        try:
            token = json.loads(body)
            value = token.get("token") or token.get("access_token")
        except (ValueError, AttributeError):
            value = None
        if not value:
            raise ImageError(f"image {self.uri!r}: the token service {realm} sent no token", errno.EACCES)
        self.auth = f"Bearer {value}"
        return True

    def document(self, path: str, accept: str, digest: str = "") -> tuple[Any, str, str]:
        """A JSON document, its media type and its digest (checked against ``digest``,
        or else the registry's Docker-Content-Digest when it sends one)."""
        def fetch() -> tuple[bytes, str, str]:
            conn, response = self.open(path, accept)
            try:
                body = response.read(MAX_JSON + 1)
            except (OSError, http.client.HTTPException) as err:
                raise _Transient(f"{path}: {err}") from err
            finally:
                conn.close()
            return body, response.getheader("Content-Type", ""), response.getheader("Docker-Content-Digest", "")

        body, media_type, sent = _retrying(self.uri, fetch)
        if len(body) > MAX_JSON:
            raise ImageError(f"image {self.uri!r}: {path} is larger than {MAX_JSON} bytes")
        got = "sha256:" + hashlib.sha256(body).hexdigest()
        expected = digest or (sent if sent.startswith("sha256:") else "")
        if expected and got != expected:
            raise ImageError(f"image {self.uri!r}: {path} does not match its digest {expected} (got {got})",
                             errno.EBADMSG)
        try:
            parsed = json.loads(body)
        except ValueError as err:
            raise ImageError(f"image {self.uri!r}: {path} is not JSON: {err}") from err
        return parsed, str(parsed.get("mediaType") or media_type.split(";")[0]), got

    def blob(self, digest: str, size: int) -> Blob:
        path = f"/v2/{self.ref.repo}/blobs/{digest}"
        return Blob(digest, size, lambda: _BlobStream(self, path, digest))  # type: ignore[arg-type,return-value]


class _Transient(Exception):
    """A failure worth a retry (connection, timeout, 5xx)."""


def _retrying(uri: str, step: Any) -> Any:
    for attempt in range(RETRIES + 1):
        try:
            return step()
        except _Transient as err:
            if attempt == RETRIES:
                raise ImageError(f"image {uri!r}: {err} (after {RETRIES + 1} attempts)", errno.EIO) from err
            time.sleep(min(2.0, 0.1 * 2 ** attempt))
    raise AssertionError("unreachable")


def _challenge_params(params: str) -> list[tuple[str, str]]:
    found = []
    for item in _split_commas(params):
        key, _, value = item.strip().partition("=")
        found.append((key.strip().lower(), value.strip().strip('"')))
    return found


def _split_commas(text: str) -> list[str]:
    parts, current, quoted = [], "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current] if current else parts


class _BlobStream:
    """A blob's bytes, resuming with a Range request where a download broke off."""

    def __init__(self, session: _Session, path: str, digest: str) -> None:
        self._session, self._path, self._digest = session, path, digest
        self._offset = 0
        self._failures = 0
        self._conn: http.client.HTTPConnection | None = None
        self._response: http.client.HTTPResponse | None = None
        self._started = time.monotonic()

    def _connect(self) -> None:
        conn, response = _retrying(self._session.uri, lambda: self._session.open(self._path, start=self._offset))
        if self._offset and response.status != 206:  # no ranges: skip what we have
            skip = self._offset
            while skip:
                data = response.read(min(skip, CHUNK))
                if not data:
                    raise _Transient(f"{self._path}: ended before byte {self._offset}")
                skip -= len(data)
        self._conn, self._response = conn, response

    def read(self, n: int = CHUNK) -> bytes:
        while True:
            try:
                if self._response is None:
                    self._connect()
                assert self._response is not None
                data = self._response.read(n if n > 0 else CHUNK)
            except (_Transient, OSError, http.client.HTTPException) as err:
                self._drop()
                self._failures += 1
                if self._failures > RETRIES:
                    raise ImageError(f"image {self._session.uri!r}: layer {self._digest}: {err} "
                                     f"(after {RETRIES} resumed attempts)", errno.EIO) from err
                log.info("layer %s: download broke off at byte %d (%s); resuming", self._digest, self._offset, err)
                continue
            if not data and self._response.length:  # the connection ended before the body did
                self._drop()
                self._failures += 1
                if self._failures > RETRIES:
                    raise ImageError(f"image {self._session.uri!r}: layer {self._digest}: the download kept "
                                     f"ending early (after {RETRIES} resumed attempts)", errno.EIO)
                log.info("layer %s: download ended early at byte %d; resuming", self._digest, self._offset)
                continue
            if not data:
                log.info("pulled layer %s: %d bytes in %.1f s", self._digest, self._offset,
                         time.monotonic() - self._started)
            self._offset += len(data)
            return data

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._response = None

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> _BlobStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve(uri: str, username: str = "", password: str = "") -> Resolved:
    """The image ``uri`` names in its registry: manifest and config fetched and checked,
    layers as Blobs to stream. Blocking; raises ImageError."""
    ref = parse(uri)
    session = _Session(ref, uri, username, password)
    reference = check_digest(ref.tag) if ref.tag.startswith("sha256:") else ref.tag
    manifest, media_type, digest = session.document(f"/v2/{ref.repo}/manifests/{reference}", ACCEPT,
                                                    reference if reference.startswith("sha256:") else "")
    for _ in range(4):
        if media_type not in INDEX_TYPES:
            break
        entry = pick_platform(list(manifest.get("manifests") or []), uri)
        digest = check_digest(str(entry.get("digest")))
        manifest, media_type, digest = session.document(f"/v2/{ref.repo}/manifests/{digest}", ACCEPT, digest)
    sizes = {str(layer.get("digest")): int(layer.get("size", -1)) for layer in manifest.get("layers") or []}

    def read_config(config_digest: str) -> Any:
        return session.document(f"/v2/{ref.repo}/blobs/{config_digest}", "", config_digest)[0]

    resolved = from_manifest(manifest, digest, uri, read_config, lambda d: session.blob(d, sizes.get(d, -1)))
    log.info("image %s: manifest %s, %d layers", uri, digest, len(resolved.blobs))
    return resolved
