"""A loopback HTTP server that plays the Hugging Face hub for huggingface_hub's download path.

huggingface_hub sends ``HEAD {endpoint}/{repo}/resolve/{revision}/{file}`` and wants 200 with
``X-Repo-Commit``, ``ETag`` (the LFS sha256, quoted) and ``Content-Length``; then it GETs the
same URL (with ``Range`` when resuming). Errors are told apart by ``X-Error-Code``. No
``X-Xet-Hash`` is ever sent, so the plain HTTP path is used.

Each file can misbehave: ``corrupt`` serves bytes of the right length with one byte flipped
(headers still describe the good file), ``truncate`` promises the full length but sends only
``len(data) // 2`` bytes per response, then closes the connection.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

Mode = Literal["ok", "corrupt", "truncate"]

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class HubFile:
    data: bytes
    commit: str
    branch: str = "main"
    mode: Mode = "ok"
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()

    def body(self) -> bytes:
        if self.mode == "corrupt":
            mid = len(self.data) // 2
            return self.data[:mid] + bytes([self.data[mid] ^ 0xFF]) + self.data[mid + 1 :]
        return self.data


class FakeHub:
    """``with FakeHub() as hub: hub.add(...); hub.url`` -- counts every request in ``hub.requests``."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], HubFile] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, repo: str, filename: str, data: bytes, commit: str, mode: Mode = "ok") -> HubFile:
        self.files[(repo, filename)] = f = HubFile(data=data, commit=commit, mode=mode)
        return f

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((h.command, h.path))
        m = _RESOLVE.match(h.path.split("?")[0])
        if not m:
            return self._error(h, 404, "RepoNotFound")
        repo, revision, filename = m["repo"], m["revision"], m["filename"]
        if not any(r == repo for r, _ in self.files):
            return self._error(h, 404, "RepoNotFound")
        f = self.files.get((repo, filename))
        commits = {hf.commit for (r, _), hf in self.files.items() if r == repo}
        if revision not in commits and revision != "main":
            return self._error(h, 404, "RevisionNotFound")
        if f is None or revision not in (f.commit, f.branch):
            commit = next(iter(commits))
            return self._error(h, 404, "EntryNotFound", {"X-Repo-Commit": commit})

        data = f.body()
        start, end, status = 0, len(data) - 1, 200
        rng = _RANGE.match(h.headers.get("Range", "")) if body else None
        if rng:
            start = int(rng[1])
            end = int(rng[2]) if rng[2] else end
            status = 206
        h.send_response(status)
        h.send_header("X-Repo-Commit", f.commit)
        h.send_header("ETag", f'"{f.sha256}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if not body:
            return None
        stop = end + 1
        if f.mode == "truncate":
            stop = min(stop, len(data) // 2)
            h.close_connection = True
        chunk = 1 << 20
        for pos in range(start, max(start, stop), chunk):
            h.wfile.write(data[pos : min(pos + chunk, stop)])
        h.wfile.flush()
        return None

    @staticmethod
    def _error(
        h: BaseHTTPRequestHandler, status: int, code: str, extra: dict[str, str] | None = None
    ) -> None:
        message = f"{code}: {h.path}".encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", code)
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Content-Length", str(len(message)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(message)
