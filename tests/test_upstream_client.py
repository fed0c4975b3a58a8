"""The lean upstream client (proxy/upstream_client.py) against raw loopback servers.

The SDK suites exercise it behind the proxy; these tests hold it to the wire details a
well-behaved upstream rarely shows: interim 1xx answers, close-delimited bodies, HEAD,
``Connection: close``, silences (read timeout) and broken connections, pooling and its
limit, flow control with a slow reader, and header bytes that must survive unchanged.
Each runs on both event loops the proxy may use (asyncio's and uvloop's).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy.upstream_client import (
    HIGH_WATER,
    Origin,
    Timeouts,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamDisconnected,
)

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
T = Timeouts(connect=2.0, read=2.0)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    def runner(coro: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            r.run(asyncio.wait_for(coro, 20))

    return runner


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (Content-Length framed)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


class Server:
    """A raw HTTP server: ``handler`` does the talking on each connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Origin:
        async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return Origin.of(f"http://127.0.0.1:{port}/base")

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def keep_answering(body: bytes = b'{"ok":true}', extra: bytes = b"") -> Handler:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_request(r)
            w.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + extra
                + b"Content-Length: %d\r\n\r\n" % len(body)
                + body
            )
            await w.drain()

    return handler


def test_origin_parsing() -> None:
    o = Origin.of("https://api.openai.com/v1")
    assert (o.scheme, o.host, o.port, o.base_path, o.host_header, o.tls) == (
        "https",
        "api.openai.com",
        443,
        "/v1",
        "api.openai.com",
        True,
    )
    o = Origin.of("http://[::1]:8080")
    assert (o.host, o.port, o.base_path, o.host_header) == ("::1", 8080, "", "[::1]:8080")
    with pytest.raises(ValueError):
        Origin.of("ftp://example.com")


def test_request_bytes_are_exactly_the_callers(run: Callable[..., None]) -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(await read_request(r))
        w.write(
            b"HTTP/1.1 201 Made It\r\nX-A: 1\r\nX-A: 2\r\nX-Odd: caf\xc3\xa9 \xff\r\n"
            b"Content-Length: 2\r\n\r\nhi"
        )
        await w.drain()

    async def main() -> None:
        client = UpstreamClient(limit=4)
        async with Server(handler) as origin:
            headers = [("Authorization", "Bearer sk-x"), ("X-Caf", "café"), ("accept", "a/b")]
            resp = await client.request(
                "POST", origin, "/base/v1/chat?x=%2F", headers, b'{"a":1}', T
            )
            assert (resp.status, resp.reason) == (201, "Made It")
            assert resp.headers.getall("x-a") == ["1", "2"]
            # Bytes that are not UTF-8 survive: re-encoded they are the upstream's own.
            assert resp.headers["X-Odd"].encode("utf-8", "surrogateescape") == b"caf\xc3\xa9 \xff"
            assert await resp.read() == b"hi"
            resp.release()
            await client.close()
        head, body = seen[0]
        assert head == (
            b"POST /base/v1/chat?x=%%2F HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Authorization: Bearer sk-x\r\nX-Caf: caf\xc3\xa9\r\naccept: a/b\r\n"
            b"Content-Length: 7\r\n\r\n" % origin.port
        )
        assert body == b'{"a":1}'

    run(main())


@pytest.mark.parametrize(
    "bad", [("X-A", "v\r\nX-Injected: 1"), ("X-A", "v\nb"), ("X-A", "v\x00"), ("X\r\nB", "v")]
)
def test_header_injection_is_refused(run: Callable[..., None], bad: tuple[str, str]) -> None:
    async def main() -> None:
        client = UpstreamClient(limit=1)
        async with Server(keep_answering()) as origin:
            with pytest.raises(ValueError, match="CR, LF or NUL"):
                await client.request("GET", origin, "/", [bad], None, T)
            # The slot was not leaked: the next request goes through.
            resp = await client.request("GET", origin, "/", [], None, T)
            assert await resp.read() == b'{"ok":true}'
            resp.release()

    run(main())


def test_connections_are_reused_and_limited(run: Callable[..., None]) -> None:
    server = Server(keep_answering())

    async def main() -> None:
        client = UpstreamClient(limit=2)
        async with server as origin:
            for _ in range(5):
                resp = await client.request("POST", origin, "/", [], b"x", T)
                assert await resp.read() == b'{"ok":true}'
                resp.release()
            assert server.connections == 1  # one kept-alive connection did all five

            # A third concurrent request waits for a slot, then gets one.
            a = await client.request("POST", origin, "/", [], b"x", T)
            b = await client.request("POST", origin, "/", [], b"x", T)
            third = asyncio.ensure_future(client.request("POST", origin, "/", [], b"x", T))
            await asyncio.sleep(0.05)
            assert not third.done()
            await a.read()
            a.release()
            c = await asyncio.wait_for(third, 2)
            for r in (b, c):
                await r.read()
                r.release()
            assert server.connections == 2
            await client.close()

    run(main())


def test_connection_close_and_unfinished_bodies_are_not_reused(run: Callable[..., None]) -> None:
    server = Server(keep_answering(extra=b"Connection: close\r\n"))

    async def unfinished(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(r)
            if b"/half" in head:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
            else:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()

    other = Server(unfinished)

    async def main() -> None:
        client = UpstreamClient(limit=2)
        async with server as origin:
            for _ in range(2):
                resp = await client.request("GET", origin, "/", [], None, T)
                await resp.read()
                resp.release()
            assert server.connections == 2
        async with other as origin:
            resp = await client.request("GET", origin, "/half", [], None, T)
            assert await resp.content.readany() == b"12345"
            resp.release()  # the body is unfinished: the connection cannot be reused
            for _ in range(2):
                resp = await client.request("GET", origin, "/", [], None, T)
                assert await resp.read() == b"ok"
                resp.release()
            assert other.connections == 2

    run(main())


def test_chunked_interim_and_close_delimited_bodies(run: Callable[..., None]) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            w.write(b"%x\r\n%s\r\n" % (len(part), part))
            await w.drain()
            await asyncio.sleep(0.02)
        w.write(b"0\r\n\r\n")
        await read_request(r)
        w.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        await w.drain()
        w.close()

    async def main() -> None:
        client = UpstreamClient(limit=1)
        async with Server(handler) as origin:
            resp = await client.request("POST", origin, "/", [], b"{}", T)
            assert resp.status == 200 and "Link" not in resp.headers
            chunks = []
            while chunk := await resp.content.readany():
                chunks.append(chunk)
            assert b"".join(chunks) == b"data: 1\n\ndata: 2\n\n" and len(chunks) == 2
            resp.release()
            resp = await client.request("POST", origin, "/", [], b"{}", T)
            assert await resp.read() == b"until the end"
            resp.release()

    run(main())


def test_head_has_no_body(run: Callable[..., None]) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        await w.drain()
        await asyncio.sleep(1)

    async def main() -> None:
        client = UpstreamClient(limit=1)
        async with Server(handler) as origin:
            resp = await client.request("HEAD", origin, "/", [], None, T)
            assert resp.headers["Content-Length"] == "1000"
            assert await asyncio.wait_for(resp.read(), 0.5) == b""
            resp.release()

    run(main())


def test_silences_time_out_headers_and_body(run: Callable[..., None]) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head, _ = await read_request(r)
        if b"/silent-head" in head:
            await asyncio.sleep(5)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        # Data every 0.1 s keeps a 0.3 s read timeout at bay; then silence.
        for _ in range(5):
            w.write(b"x")
            await w.drain()
            await asyncio.sleep(0.1)
        await asyncio.sleep(5)

    async def main() -> None:
        client = UpstreamClient(limit=2)
        quick = Timeouts(connect=2.0, read=0.3)
        async with Server(handler) as origin:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(TimeoutError):
                await client.request("GET", origin, "/silent-head", [], None, quick)
            assert 0.25 < loop.time() - t0 < 1.5
            resp = await client.request("GET", origin, "/", [], None, quick)
            got = b""
            with pytest.raises(TimeoutError):
                while chunk := await resp.content.readany():
                    got += chunk
            assert got == b"xxxxx"  # everything that arrived was handed over first
            resp.release()

    run(main())


def test_broken_connections(run: Callable[..., None]) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head, _ = await read_request(r)
        if b"/garbage" in head:
            w.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        elif b"/no-answer" in head:
            pass
        else:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await w.drain()
        w.close()

    async def main() -> None:
        client = UpstreamClient(limit=1)
        async with Server(handler) as origin:
            with pytest.raises(UpstreamDisconnected, match="not HTTP"):
                await client.request("GET", origin, "/garbage", [], None, T)
            with pytest.raises(UpstreamDisconnected, match="closed"):
                await client.request("GET", origin, "/no-answer", [], None, T)
            resp = await client.request("GET", origin, "/cut", [], None, T)
            assert await resp.content.readany() == b"partial"
            with pytest.raises(UpstreamDisconnected):
                await resp.content.readany()
            resp.release()
        # Nothing listens there any more: the request was never sent.
        with pytest.raises(UpstreamConnectError) as info:
            await client.request("GET", origin, "/", [], None, T)
        assert not isinstance(info.value, TimeoutError)

    run(main())


def test_close_wakes_a_waiting_reader(run: Callable[..., None]) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await w.drain()
        await asyncio.sleep(5)

    async def main() -> None:
        client = UpstreamClient(limit=1)
        async with Server(handler) as origin:
            resp = await client.request("GET", origin, "/", [], None, T)
            reading = asyncio.ensure_future(resp.content.readany())
            await asyncio.sleep(0.05)
            resp.close()
            with pytest.raises(UpstreamDisconnected):
                await asyncio.wait_for(reading, 1)
            # The slot came back: a new request is not held by the limit of one.
            again = await asyncio.wait_for(client.request("GET", origin, "/", [], None, T), 1)
            assert again.status == 200
            again.close()

    run(main())


def test_a_slow_reader_pauses_the_upstream(run: Callable[..., None]) -> None:
    sent = 0
    total = 128 * HIGH_WATER  # 32 MiB: more than loopback socket buffers hold

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"y" * 65536
        while sent < total:
            w.write(block)
            await w.drain()
            sent += len(block)

    async def main() -> None:
        client = UpstreamClient(limit=1)
        async with Server(handler) as origin:
            resp = await client.request("GET", origin, "/", [], None, T)
            await asyncio.sleep(0.3)
            # Paused: the server is held back by TCP (the kernel buffers a few MiB at
            # most on loopback), not read into the proxy's memory.
            assert sent < total
            got = 0
            while chunk := await resp.content.readany():
                got += len(chunk)
            assert got == total
            resp.release()

    run(main())


def test_connect_timeout_is_a_connect_error(run: Callable[..., None]) -> None:
    async def main() -> None:
        client = UpstreamClient(limit=1)
        origin = Origin.of("http://127.0.0.1:9")
        with pytest.raises(UpstreamConnectError):
            await client.request("GET", origin, "/", [], None, Timeouts(connect=0, read=1))

    run(main())


def test_a_stale_kept_alive_connection(run: Callable[..., None]) -> None:
    """The upstream drops a kept-alive connection as the next request arrives: a GET is
    sent again on a new connection, a POST is not (it may have reached the provider)."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await read_request(r)  # the second request on this connection: dropped

    server = Server(handler)

    async def main() -> None:
        async with server as origin:
            for method, expect_retry in (("GET", True), ("POST", False)):
                client = UpstreamClient(limit=1)
                resp = await client.request(method, origin, "/", [], None, T)
                assert await resp.read() == b"ok"
                resp.release()
                before = server.connections
                if expect_retry:
                    resp = await client.request(method, origin, "/", [], None, T)
                    assert await resp.read() == b"ok"
                    resp.release()
                    assert server.connections == before + 1
                else:
                    with pytest.raises(UpstreamDisconnected):
                        await client.request(method, origin, "/", [], None, T)
                    assert server.connections == before
                await client.close()

    run(main())


def test_https_upstreams_are_verified(run: Callable[..., None], tmp_path: Path) -> None:
    """TLS with the certificate checked against the trust store and the host name: a
    server whose certificate the client does not trust is refused before any request
    byte leaves (an UpstreamConnectError: free, like a refused connection)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    seen: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            while True:
                head, body = await read_request(r)
                seen.append(head + body)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
                await w.drain()

    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            good = Origin.of(f"https://localhost:{port}/v1")
            client = UpstreamClient(limit=2, ssl_context=trusting)
            for _ in range(2):  # the second on the kept-alive TLS connection
                resp = await client.request("POST", good, "/v1/x", [], b"{}", T)
                assert await resp.read() == b"secret"
                resp.release()
            await client.close()
            # The system trust store does not know this certificate.
            with pytest.raises(UpstreamConnectError, match=r"SSL|certificate"):
                await UpstreamClient(limit=1).request("POST", good, "/v1/x", [], b"{}", T)
            # Trusted certificate, wrong name: 127.0.0.1 is not in it.
            wrong = Origin.of(f"https://127.0.0.1:{port}/v1")
            with pytest.raises(UpstreamConnectError):
                await UpstreamClient(limit=1, ssl_context=trusting).request(
                    "POST", wrong, "/v1/x", [], b"{}", T
                )
        finally:
            server.close()
        assert len(seen) == 2 and seen[0].startswith(b"POST /v1/x HTTP/1.1\r\nHost: localhost:")

    run(main())
