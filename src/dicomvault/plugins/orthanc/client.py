"""A small client for Orthanc's REST API (stdlib only), and its addresses:
``orthanc+http://[USER:PASSWORD@]HOST:PORT[/PREFIX]`` (or ``orthanc+https``).
Errors become :class:`DatabaseError` naming the request, never a password."""
from __future__ import annotations

import base64
import json
import os
import urllib.error
from typing import Any, BinaryIO, cast
from urllib.parse import quote, urlsplit, urlunsplit

from dicomvault.engine import DatabaseError

SCHEMES = ("orthanc+http", "orthanc+https")
TIMEOUT = 120


def is_orthanc(url: str) -> bool:
    return "://" in url and url.split("://", 1)[0].lower() in SCHEMES


class Orthanc:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        netloc = f"{host}:{parts.port}" if parts.port else host
        self.base = urlunsplit((parts.scheme.split("+", 1)[1], netloc, parts.path.rstrip("/"), "", ""))
        self.name = f"Orthanc {self.base}"
        self.headers: dict[str, str] = {}
        if parts.username:
            token = f"{parts.username}:{parts.password or ''}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(token).decode()

    def _send(self, method: str, path: str, body: bytes | BinaryIO | None = None,
              length: int | None = None) -> Any:
        from urllib.request import Request, urlopen  # here: loading it costs every command at start
        req = Request(self.base + path, data=body, method=method, headers=dict(self.headers))
        if length is not None:
            req.add_header("Content-Length", str(length))
        try:
            return urlopen(req, timeout=TIMEOUT)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                exc.close()
                raise NotFound(path) from None
            detail = exc.read(2000).decode("utf-8", "replace")
            exc.close()
            raise DatabaseError(f"{self.name}: {method} {path} answered {exc.code} "
                                f"{' '.join(detail.split())[:300]}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise DatabaseError(f"{self.name}: {method} {path} failed: {exc}") from None

    def get_json(self, path: str) -> Any:
        with self._send("GET", path) as resp:
            return json.loads(resp.read())

    def post_json(self, path: str, body: bytes) -> Any:
        with self._send("POST", path, body) as resp:
            return json.loads(resp.read())

    def upload(self, fh: BinaryIO) -> Any:
        """POST /instances a whole file, streamed."""
        size = os.fstat(fh.fileno()).st_size
        with self._send("POST", "/instances", fh, size) as resp:
            return json.loads(resp.read())

    def open(self, path: str) -> BinaryIO:
        return cast(BinaryIO, self._send("GET", path))

    def put_text(self, path: str, text: str) -> None:
        self._send("PUT", path, text.encode("utf-8")).close()

    def delete(self, path: str) -> None:
        self._send("DELETE", path).close()

    def metadata(self, level: str, oid: str) -> dict[str, str]:
        try:
            return cast(dict[str, str], self.get_json(f"/{level}/{oid}/metadata?expand"))
        except NotFound:
            return {}

    def lookup(self, uid: str, kind: str) -> str | None:
        """The Orthanc id of a DICOM UID (kind: Patient, Study, Series, Instance)."""
        for hit in self.post_json("/tools/lookup", uid.encode()):
            if hit.get("Type") == kind:
                return str(hit["ID"])
        return None


class NotFound(DatabaseError):
    def __init__(self, path: str) -> None:
        super().__init__(f"not found: {quote(path)}")
