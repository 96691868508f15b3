"""A local S3-compatible server for the tests (moto's threaded server on 127.0.0.1) and a fault-injecting proxy.

The proxy sits between a client and the server and, by rule, answers requests with a 503, cuts a response body
half-way, or refuses an access key with S3's 403 ``InvalidAccessKeyId`` — so the retry and error paths of the S3
store run over real HTTP. It counts the requests it saw by method.
"""

from __future__ import annotations

import http.client
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from moto.server import ThreadedMotoServer

BAD_ACCESS_KEY = "AKIABADBADBADBAD0000"


def start_moto() -> tuple[ThreadedMotoServer, str]:
    """Start moto on 127.0.0.1 and a free port; returns the server and its endpoint URL."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@dataclass
class Rule:
    """Fault ``action`` ('503' or 'cut') for the next ``count`` requests of ``method``."""

    method: str
    action: str
    count: int


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that injects faults by rule."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.rules: list[Rule] = []
        self.seen: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_one(self) -> None:
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_one

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def inject(self, method: str, action: str, count: int) -> None:
        with self._lock:
            self.rules.append(Rule(method, action, count))

    def _take(self, method: str) -> str | None:
        with self._lock:
            self.seen[method] += 1
            for rule in self.rules:
                if rule.method == method and rule.count > 0:
                    rule.count -= 1
                    self.faults[rule.action] += 1
                    return rule.action
        return None

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        if f"Credential={BAD_ACCESS_KEY}/" in request.headers.get("Authorization", ""):
            self._error(request, 403, "InvalidAccessKeyId",
                        "The AWS Access Key Id you provided does not exist in our records.")
            return
        action = self._take(request.command)
        if action == "503":
            self._error(request, 503, "SlowDown", "Please reduce your request rate.")
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            headers["Host"] = request.headers.get("Host", "")
            conn.request(request.command, request.path, body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        request.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                request.send_header(key, value)
        length = response.getheader("Content-Length") if request.command == "HEAD" else None
        request.send_header("Content-Length", length or str(len(payload)))
        if action == "cut":  # promise the whole body, send half, hang up
            request.send_header("Connection", "close")
            request.end_headers()
            request.wfile.write(payload[: len(payload) // 2])
            request.wfile.flush()
            request.close_connection = True
            return
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(payload)

    @staticmethod
    def _error(request: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                "<RequestId>fault</RequestId></Error>").encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/xml")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
