"""A lean HTTP/1.1 client for the one hop the proxy makes: to a configured upstream.

Why not ``aiohttp.ClientSession``: profiles of the proxy under load put aiohttp's client
at 190-220 µs of CPU per small request (of 640-760 in all): URL and header
normalisation, cookie and redirect machinery, auto headers, a ``ClientRequest`` and a
``ClientResponse`` with their tasks and timers, a ``StreamReader`` per response, and a
read-timeout timer re-armed on every received chunk. The proxy needs none of that: it
sends bytes it already has to a host it already knows, and relays the bytes it gets.

What this client does, and only that:

- **One request per connection at a time**, connections kept alive and reused (most
  recently used first: its socket is warm), closed after ``keepalive_s`` idle, after a
  ``Connection: close`` or an incomplete exchange. At most ``limit`` requests in flight
  across all upstreams; more wait in FIFO order (as aiohttp's connector limit did).
- **Requests** are written as one ``writelines``: the head the caller's headers make
  (no header is added but ``Host`` and ``Content-Length``; none is changed), then the
  body as it is. A header value with CR, LF or NUL is refused (:class:`ValueError`), so
  nothing the proxy relays can split a request.
- **Responses** are parsed by llhttp (``httptools``, the parser uvicorn uses): status,
  headers (a ``CIMultiDictProxy``, values decoded like aiohttp's: UTF-8 with
  ``surrogateescape``, so every byte survives the relay), and the body de-chunked but
  never decompressed. 1xx interim responses are skipped; a body delimited by the
  connection's close is supported; an upgrade is refused.
- **Flow control**: reading from the upstream pauses while more than ``HIGH_WATER``
  bytes wait for the relay (a slow client), and resumes below ``LOW_WATER``.
- **Timeouts**: ``connect`` bounds opening a connection (TLS included); ``read`` bounds
  every silence of the upstream while a response is awaited, headers and body alike,
  never the whole exchange (a reasoning stream may run for many minutes). One timer per
  exchange, re-armed only when it fires early, not per chunk. Both raise
  :class:`TimeoutError` (a connect timeout is also an :class:`UpstreamConnectError`: the
  upstream never got the request).
- **Errors**: :class:`UpstreamConnectError` when no connection could be opened (the
  request was never sent, so it costs nothing), :class:`UpstreamDisconnected` when the
  connection broke or the upstream answered with something that is not HTTP/1.x. When a
  kept-alive connection turns out closed by the upstream before any byte of the answer,
  an idempotent request (GET, ...) is sent once more on a new connection; a POST never
  is: one that may have reached the provider is never sent twice.
- No proxies from the environment, no cookies, no redirects (a 3xx is relayed as it
  is), no decompression: exactly what the aiohttp session was configured to do.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import socket
import ssl
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Final, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

__all__ = [
    "HIGH_WATER",
    "LOW_WATER",
    "Origin",
    "Timeouts",
    "UpstreamClient",
    "UpstreamClientError",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamDisconnected",
    "UpstreamResponse",
]

HIGH_WATER: Final = 256 * 1024
"""Body bytes received but not yet taken by the relay above which reading pauses."""
LOW_WATER: Final = 64 * 1024
"""... and below which it resumes."""
DEFAULT_KEEPALIVE_S: Final = 15.0
"""How long an idle connection is kept for reuse (aiohttp's default too)."""

_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
"""Methods that carry ``Content-Length: 0`` even without a body (as aiohttp sent)."""
_FORBIDDEN_IN_HEADERS: Final = ("\r", "\n", "\x00")
_RETRY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Idempotent methods (RFC 9110 §9.2.2): retried once on a stale kept-alive connection."""


class UpstreamClientError(Exception):
    """The exchange with the upstream failed (base class)."""


class UpstreamConnectError(UpstreamClientError):
    """No connection could be opened: the request was never sent."""


class UpstreamConnectTimeout(UpstreamConnectError, TimeoutError):
    """Opening the connection took longer than the connect timeout."""


class UpstreamDisconnected(UpstreamClientError):
    """The connection broke, or the upstream's answer is not valid HTTP/1.x."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an upstream lives, parsed once from its configured URL."""

    scheme: str
    host: str
    port: int
    base_path: str
    host_header: str

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def of(url: str) -> Origin:
        """Parse ``http(s)://host[:port][/base]`` (config has checked the form)."""
        parsed = URL(url, encoded=True)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"An upstream URL must be http(s)://host..., not {url!r}.")
        host = parsed.host
        default = 443 if parsed.scheme == "https" else 80
        port = parsed.port or default
        shown = f"[{host}]" if ":" in host else host
        if port != default:
            shown += f":{port}"
        return Origin(parsed.scheme, host, port, parsed.raw_path.rstrip("/"), shown)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """``connect``: opening a connection; ``read``: any silence of the upstream."""

    connect: float
    read: float


class UpstreamResponse:
    """A response whose head has arrived; its body arrives through :meth:`readany`.

    ``content`` is the response itself, so ``resp.content.readany()`` reads as it did
    with aiohttp. Every response must end with :meth:`release` (the connection goes back
    to the pool when the body was read whole) or :meth:`close` (it is dropped).
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_client",
        "_conn",
        "_eof",
        "_exc",
        "_keep_alive",
        "_released",
        "_waiter",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, client: UpstreamClient, conn: _Connection) -> None:
        self._client = client
        self._conn = conn
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = _EMPTY_HEADERS
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._keep_alive = False
        self._released = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def content(self) -> UpstreamResponse:
        return self

    async def readany(self) -> bytes:
        """Whatever body bytes have arrived (waiting for some); ``b""`` at the end.

        Raises :class:`TimeoutError` or :class:`UpstreamDisconnected` when the body
        cannot be completed (after the bytes that did arrive have been returned)."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                self._conn.drained()
                return data
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            waiter = self._waiter = self._conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def read(self) -> bytes:
        """The whole body."""
        parts: list[bytes] = []
        while chunk := await self.readany():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Done with this response: reuse the connection if the body ended cleanly."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        if self._eof and self._exc is None and self._keep_alive and conn.reusable():
            conn.response = None
            self._client._put_back(conn)
        else:
            conn.abort()
        self._client._slot_free()

    def close(self) -> None:
        """Drop the connection now (a read in progress raises UpstreamDisconnected)."""
        if not self._eof:
            self._fail(UpstreamDisconnected("The response was closed by the proxy."))
        self._keep_alive = False
        self.release()

    # -- fed by the connection ---------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _finish(self, keep_alive: bool) -> None:
        self._eof = True
        self._keep_alive = keep_alive
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._eof or self._exc is not None:
            return
        self._exc = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


_EMPTY_HEADERS: Final[CIMultiDictProxy[str]] = CIMultiDictProxy(CIMultiDict())


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to an upstream, and the llhttp parser reading it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, str, int]) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.lost = False
        self.idle_since = 0.0
        self.head: asyncio.Future[None] | None = None
        self._method = ""
        self._status_text = bytearray()
        self._raw_headers: list[bytes] = []
        self._interim = False
        self._paused = False
        self._read_timeout = 0.0
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._close_delimited = False
        self.received = False
        """Whether any byte arrived since the request was sent."""

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):  # not TCP (a test's Unix socket)
                pass

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        self.received = True
        resp = self.response
        if resp is None or resp._eof:
            # Bytes on an idle connection, or after the answer: the connection is unusable.
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(UpstreamDisconnected("The upstream switched protocols."))
        except httptools.HttpParserError as exc:
            self._broken(UpstreamDisconnected(f"The upstream's answer is not HTTP/1.x: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_timer()
        resp = self.response
        if resp is not None:
            if self._close_delimited and exc is None:
                resp._finish(keep_alive=False)  # the body ran until the close, as declared
            else:
                self._broken(UpstreamDisconnected("The upstream closed the connection."))

    # -- llhttp callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._status_text.clear()
        self._raw_headers.clear()

    def on_status(self, status: bytes) -> None:
        self._status_text += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers += (name, value)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: wait for the real one
            return
        resp = self.response
        head = self.head
        if resp is None or head is None or head.done():
            return
        resp.status = status
        resp.reason = self._status_text.decode("latin-1")
        # Names and values alternate in _raw_headers. One decode and one split do what a
        # decode per name and value would, unless a value holds an LF (llhttp refuses
        # those, but an obs-folded line would): then one by one.
        raw = self._raw_headers
        text = b"\n".join(raw).decode("utf-8", "surrogateescape").split("\n")
        if len(text) != len(raw):
            text = [b.decode("utf-8", "surrogateescape") for b in raw]
        headers: CIMultiDict[str] = CIMultiDict(zip(text[::2], text[1::2], strict=True))
        resp.headers = CIMultiDictProxy(headers)
        self._close_delimited = (
            "Content-Length" not in headers
            and "Transfer-Encoding" not in headers
            and status not in (204, 304)
        )
        head.set_result(None)
        if self._method == "HEAD":
            resp._finish(keep_alive=False)  # llhttp cannot be told the body is absent

    def on_body(self, body: bytes) -> None:
        resp = self.response
        if resp is None or resp._eof:
            return
        resp._feed(body)
        if resp._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._cancel_timer()
        resp = self.response
        if resp is not None and not resp._eof:
            resp._finish(keep_alive=self.parser.should_keep_alive())

    # -- the exchange ------------------------------------------------------------------

    def send(self, method: str, data: Iterable[bytes], read_timeout: float) -> None:
        assert self.transport is not None
        self._method = method
        self.received = False
        self._interim = False
        self._close_delimited = False
        self._read_timeout = read_timeout
        now = self._last_data = self.loop.time()
        self._timer = self.loop.call_at(now + read_timeout, self._on_timer)
        self.transport.writelines(data)

    def drained(self) -> None:
        """The relay took the buffered body: resume reading if it was paused."""
        if self._paused and self.transport is not None:
            self._paused = False
            self._last_data = self.loop.time()  # the silence was ours, not the upstream's
            self.transport.resume_reading()

    def _on_timer(self) -> None:
        self._timer = None
        resp = self.response
        if resp is None or resp._eof or resp._exc is not None:
            return
        now = self.loop.time()
        if self._paused:
            deadline = now + self._read_timeout  # waiting for our client, not the upstream
        else:
            deadline = self._last_data + self._read_timeout
            if now >= deadline:
                self._broken(TimeoutError("The upstream stopped answering."))
                return
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _broken(self, exc: BaseException) -> None:
        head = self.head
        if head is not None and not head.done():
            head.set_exception(exc)
        if self.response is not None:
            self.response._fail(exc)
        self.abort()

    def reusable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    def abort(self) -> None:
        self._cancel_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class UpstreamClient:
    """The pool of upstream connections and the one call the pipeline makes."""

    def __init__(
        self,
        *,
        limit: int,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``ssl_context`` for https upstreams: by default the system's trust store
        (``ssl.create_default_context()``, which honours ``SSL_CERT_FILE`` and
        ``SSL_CERT_DIR``), with hostname checks."""
        if limit < 1:
            raise ValueError("The upstream connection limit must be at least 1.")
        self.limit = limit
        self.keepalive_s = keepalive_s
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._in_flight = 0
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ssl = ssl_context
        self._closed = False

    async def request(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: Collection[tuple[str, str]],
        body: bytes | None,
        timeouts: Timeouts,
    ) -> UpstreamResponse:
        """Send one request; return once the response head has arrived.

        ``target`` is the request target as sent (path and query, already encoded);
        ``headers`` are sent as they are, plus ``Host`` and ``Content-Length``."""
        head = _request_head(method, target, origin.host_header, headers, body)
        data = (head, body) if body else (head,)
        retry = method in _RETRY_METHODS
        while True:
            await self._slot_take()
            try:
                conn = self._take_idle(origin.key)
                reused = conn is not None
                if conn is None:
                    conn = await self._connect(origin, timeouts.connect)
            except BaseException:
                self._slot_free()
                raise
            resp = UpstreamResponse(self, conn)
            conn.response = resp
            conn.head = head_future = conn.loop.create_future()
            conn.send(method, data, timeouts.read)
            try:
                await head_future
            except UpstreamDisconnected:
                resp.release()
                # A kept-alive connection the upstream closed just as it was reused:
                # an idempotent request that got no byte back is sent once more, on a
                # new connection (as aiohttp does). A POST never is.
                if retry and reused and not conn.received:
                    retry = False
                    continue
                raise
            except BaseException:
                resp._fail(UpstreamDisconnected("The request was abandoned."))
                resp.release()
                raise
            finally:
                conn.head = None
            return resp

    async def close(self) -> None:
        """Close every idle connection; responses still open close when released."""
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()

    # -- pool --------------------------------------------------------------------------

    async def _slot_take(self) -> None:
        if self._in_flight < self.limit and not self._queue:
            self._in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        try:
            await waiter  # _slot_free handed its slot to us
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._slot_free()  # handed over, but we are gone: pass it on
            else:
                self._queue.remove(waiter)
            raise

    def _slot_free(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; _in_flight is unchanged
                return
        self._in_flight -= 1

    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        conns = self._idle.get(key)
        if not conns:
            return None
        now = asyncio.get_running_loop().time()
        while conns:
            conn = conns.pop()  # most recently used: its socket is warm
            if conn.reusable() and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.abort()
        return None

    def _put_back(self, conn: _Connection) -> None:
        if self._closed:
            conn.abort()
            return
        conn.idle_since = conn.loop.time()
        conns = self._idle.setdefault(conn.key, [])
        # Drop connections idle too long (from the cold end), then keep at most `limit`.
        while conns and (
            len(conns) >= self.limit or conn.idle_since - conns[0].idle_since >= self.keepalive_s
        ):
            conns.pop(0).abort()
        conns.append(conn)

    async def _connect(self, origin: Origin, connect_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(loop, origin.key)
        tls = self._ssl_context() if origin.tls else None
        try:
            async with asyncio.timeout(connect_s):
                await loop.create_connection(
                    lambda: conn,
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls is not None else None,
                )
        except TimeoutError:
            conn.abort()
            raise UpstreamConnectTimeout(
                f"Connecting to {origin.host_header} took over {connect_s:g} s."
            ) from None
        except (OSError, ssl.SSLError) as exc:
            conn.abort()
            raise UpstreamConnectError(
                f"Cannot connect to {origin.host_header}: {type(exc).__name__}: {exc}"
            ) from exc
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl


def _request_head(
    method: str,
    target: str,
    host: str,
    headers: Collection[tuple[str, str]],
    body: bytes | None,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    if body or method in _BODY_METHODS:
        lines.append(f"Content-Length: {len(body) if body else 0}\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    # Every line ends in CRLF and holds no other CR or LF: checked in two C-speed scans
    # rather than per header. (The first entry holds two lines.)
    expected = len(lines) + 1
    if text.count("\n") != expected or text.count("\r") != expected or "\x00" in text:
        for name, value in headers:
            if any(bad in name or bad in value for bad in _FORBIDDEN_IN_HEADERS):
                raise ValueError(f"The header {name!r} holds a CR, LF or NUL character.")
        raise ValueError(f"The request target {target!r} holds a CR, LF or NUL character.")
    return text.encode("utf-8", "surrogateescape")
