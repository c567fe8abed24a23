"""A schema registry behind TLS and HTTP basic auth, as managed registries are reached.

Apicurio's own authentication needs an OpenID Connect identity server; this reverse proxy on
127.0.0.1 stands in front of the stack's registry instead: it serves TLS with a certificate
from its own throwaway CA, answers 401 unless the request carries the expected basic-auth
credentials, and forwards the rest. It runs in a thread (the sink's client calls it from the
test's event loop).
"""

from __future__ import annotations

import base64
import http.server
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

import trustme


class AuthProxy:
    """https://127.0.0.1:<port>/… → `upstream`/…, for `username`:`password` only.

    `ca_file` is the PEM of the CA that signed its certificate; `authorizations` lists the
    Authorization headers it received, in order."""

    def __init__(self, upstream: str, username: str, password: str, folder: Path) -> None:
        ca = trustme.CA()
        self.ca_file = str(folder / "proxy-ca.pem")
        ca.cert_pem.write_to_path(self.ca_file)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.authorizations: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                given = self.headers.get("Authorization", "")
                proxy.authorizations.append(given)
                if given != expected:
                    self._answer(401, b'{"error_code": 401, "message": "Unauthorized"}')
                    return
                try:
                    with urllib.request.urlopen(upstream.rstrip("/") + self.path) as answer:
                        self._answer(answer.status, answer.read())
                except urllib.error.HTTPError as refused:
                    self._answer(refused.code, refused.read())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass  # quiet

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> AuthProxy:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
