"""A small HashiCorp Vault KV v2 server on 127.0.0.1 for contract tests (no Vault binary is available here).

It implements exactly the endpoints ``hvac`` calls for :class:`VaultStore`, with Vault's status codes
and JSON shapes (https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2):

- ``GET    /v1/<mount>/data/<path>``      read latest version; 404 ``{"errors": []}`` if absent
- ``POST   /v1/<mount>/data/<path>``      write ``{"data": ..., "options": {"cas": n}}``; a CAS
  mismatch is 400 ``{"errors": ["check-and-set parameter did not match the current version"]}``
- ``DELETE /v1/<mount>/metadata/<path>``  delete metadata and all versions; 204
- ``LIST   /v1/<mount>/metadata/<path>``  ``{"data": {"keys": [...]}}`` with ``dir/`` entries; 404 if empty

Every request needs ``X-Vault-Token``; a wrong one is 403 ``{"errors": ["permission denied"]}``.
``fail_writes_after`` makes writes fail with 500 after that many succeeded (a crash in mid-batch).
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeVault:
    def __init__(self, token: str = "s.test-token", mount: str = "secret") -> None:
        self.token = token
        self.mount = mount
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.lock = threading.Lock()
        self.fail_writes_after: int | None = None
        self.writes = 0
        self.requests: list[tuple[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stalls

            def _reply(self, code: int, body: Any = None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(code)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append((method, self.path))
                if self.headers.get("X-Vault-Token") != fake.token:
                    return self._reply(403, {"errors": ["permission denied"]})
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                head = f"/v1/{fake.mount}/"
                if not path.startswith(head):
                    return self._reply(404, {"errors": [f"no handler for route {path!r}"]})
                kind, _, secret = path[len(head) :].partition("/")
                with fake.lock:
                    code, out = fake.handle(method, kind, secret, body)
                self._reply(code, out)

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_PUT(self) -> None:
                self._route("POST")

            def do_DELETE(self) -> None:
                self._route("DELETE")

            def do_LIST(self) -> None:
                self._route("LIST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def handle(self, method: str, kind: str, secret: str, body: Any) -> tuple[int, Any]:
        if kind == "data" and method == "GET":
            versions = self.versions.get(secret)
            if not versions:
                return 404, {"errors": []}
            latest = versions[-1]
            return 200, {
                "data": {
                    "data": latest["data"],
                    "metadata": {"version": len(versions), "deletion_time": "", "destroyed": False},
                }
            }
        if kind == "data" and method == "POST":
            if self.fail_writes_after is not None and self.writes >= self.fail_writes_after:
                return 500, {"errors": ["simulated storage failure"]}
            if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
                return 400, {"errors": ["no data provided"]}
            cas = (body.get("options") or {}).get("cas")
            current = len(self.versions.get(secret, []))
            if cas is not None and cas != current:
                return 400, {"errors": ["check-and-set parameter did not match the current version"]}
            self.versions.setdefault(secret, []).append({"data": body["data"]})
            self.writes += 1
            return 200, {"data": {"version": current + 1, "deletion_time": "", "destroyed": False}}
        if kind == "metadata" and method == "DELETE":
            self.versions.pop(secret, None)
            return 204, None
        if kind == "metadata" and method == "LIST":
            folder = secret.rstrip("/") + "/" if secret else ""
            names = set()
            for path, versions in self.versions.items():
                if versions and path.startswith(folder):
                    rest = path[len(folder) :]
                    names.add(rest.split("/", 1)[0] + "/" if "/" in rest else rest)
            if not names:
                return 404, {"errors": []}
            return 200, {"data": {"keys": sorted(names)}}
        return 405, {"errors": ["unsupported operation"]}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
