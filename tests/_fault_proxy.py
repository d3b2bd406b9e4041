"""A fault-injecting HTTP proxy on loopback, for tests of how the pipeline meets an object store under load.

:class:`FaultProxy` forwards each HTTP/1.1 request to one upstream (the moto S3 server of the tests) and, for a
seeded share of them, answers as a throttled object store does instead:

- ``slowdown``: ``503 Slow Down`` with S3's XML error body (``<Code>SlowDown</Code>``; no body for HEAD, as S3);
  the request never reaches the upstream.
- ``reset_before``: the connection is reset (TCP RST) after the request was read, before it was forwarded.
- ``reset_after``: the request is forwarded and applied upstream, then the connection is reset instead of the
  response being sent (the client cannot tell whether its request happened).

Which requests fail is deterministic for a seed and does not depend on the order in which concurrent requests
arrive: the fate of the ``n``-th request for one ``METHOD path?query`` is a hash of ``(seed, METHOD path?query,
n)``. A retried request is a new ``n``, so it gets a fresh draw, and the set of faults of a run depends only on
the requests the client makes.
"""
from __future__ import annotations

import collections
import hashlib
import http.client
import socket
import struct
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FaultProxy", "SLOWDOWN_BODY"]

#: The body of S3's 503 throttling answer (the shape AWS S3 sends; clients match on ``Code``).
SLOWDOWN_BODY: bytes = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTPROXY</RequestId><HostId>fault-proxy</HostId></Error>"
)
#: Hop-by-hop headers a proxy must not pass on (RFC 9110 7.6.1), plus the length, which it sets itself.
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
        "content-length"}


class FaultProxy:
    """``with FaultProxy("http://127.0.0.1:PORT", slowdown=0.1, reset=0.02, seed=0) as proxy: proxy.url``.

    Args:
        upstream: ``http://host:port`` of the server behind the proxy.
        slowdown: share of requests answered ``503 SlowDown``.
        reset: share of requests whose connection is reset; half before forwarding, half after.
        seed: chooses which requests fail.
        rule: optional ``rule(method, target, n) -> fate or None`` deciding the ``n``-th request (0-based) for
            ``METHOD target`` before the seeded draw (to aim a fault at one request); None = draw.

    Attributes:
        counts: ``Counter`` of ``"forwarded"`` (answered by the upstream) and of each fault kind, in all and per
            method (``"slowdown"``, ``"slowdown PUT"``, ...).
        methods: ``Counter`` of request methods seen (``"GET"``, ``"PUT"``, ...).
    """

    def __init__(self, upstream: str, *, slowdown: float = 0.1, reset: float = 0.02, seed: int = 0,
                 rule: Callable[[str, str, int], str | None] | None = None) -> None:
        host, _, port = upstream.split("://", 1)[-1].rstrip("/").partition(":")
        self.upstream = (host, int(port or 80))
        self.slowdown, self.reset, self.seed, self.rule = slowdown, reset, seed, rule
        self.counts: collections.Counter[str] = collections.Counter()
        self.methods: collections.Counter[str] = collections.Counter()
        self._seen: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        """The proxy's endpoint, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def fate(self, method: str, target: str) -> str:
        """``"forward"`` or the fault kind (``"slowdown"``, ``"reset_before"``, ``"reset_after"``) of the next
        request ``method target``."""
        key = f"{method} {target}"
        with self._lock:
            n = self._seen[key]
            self._seen[key] += 1
            self.methods[method] += 1
        chosen = self.rule(method, target, n) if self.rule else None
        if chosen is not None:
            return chosen
        digest = hashlib.blake2b(f"{self.seed}|{key}|{n}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2.0**64
        if u < self.slowdown:
            return "slowdown"
        if u < self.slowdown + self.reset / 2:
            return "reset_before"
        if u < self.slowdown + self.reset:
            return "reset_after"
        return "forward"

    @property
    def faults(self) -> int:
        """Requests answered with a fault so far."""
        return sum(self.counts[k] for k in ("slowdown", "reset_before", "reset_after"))

    def count(self, what: str, method: str) -> None:
        with self._lock:
            self.counts[what] += 1
            self.counts[f"{what} {method}"] += 1


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as clients of S3 use it

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reset(self) -> None:
            """Abort the connection with a TCP RST (SO_LINGER 0, then close)."""
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "expect"}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            finally:
                conn.close()

        def _handle(self) -> None:
            body = self._body()
            fate = proxy.fate(self.command, self.path)
            if fate == "reset_before":
                proxy.count(fate, self.command)
                self._reset()
                return
            if fate == "slowdown":
                proxy.count(fate, self.command)
                data = b"" if self.command == "HEAD" else SLOWDOWN_BODY
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            status, reason, headers, data = self._forward(body)
            if fate == "reset_after":
                proxy.count(fate, self.command)
                self._reset()
                return
            proxy.count("forwarded", self.command)
            self.send_response(status, reason)
            length = str(len(data))
            for k, v in headers:
                if k.lower() == "content-length" and self.command == "HEAD":
                    length = v  # a HEAD's length is the object's, with no body
                elif k.lower() not in _HOP and k.lower() not in ("server", "date"):
                    self.send_header(k, v)
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
