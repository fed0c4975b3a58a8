"""The reference hop: a minimal aiohttp pass-through proxy, for the benchmark.

It does what any HTTP proxy written with aiohttp must do and nothing else, so the
difference between it and Metergate is the cost of metering, not of Python or aiohttp:

- one pooled ``ClientSession`` (no per-request connection set-up);
- ``/{upstream}/{path}`` goes to ``{url}/{path}`` with the query string unchanged, the
  same URL shape as Metergate, so the same client requests work against both;
- request and response headers are copied minus hop-by-hop ones (RFC 9110 §7.6.1);
- the request body and the response body are *streamed* through chunk by chunk
  (``Content-Length`` kept when the sender gave one, so nothing becomes chunked);
- bytes are relayed as received (``auto_decompress=False``);
- uvloop, no access log.

No keys are swapped: the client's ``Authorization`` goes to the upstream as is.

    python bench/bare_proxy.py --port 9100 --upstream openai=http://127.0.0.1:9000 \
        --upstream anthropic=http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
REQUEST_DROP = HOP_BY_HOP | {"host"}
RESPONSE_DROP = HOP_BY_HOP | {"content-length"}

UPSTREAMS = web.AppKey("upstreams", dict)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def _copy(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    if "Connection" in headers:  # headers named in Connection are hop-by-hop too
        drop = drop | {
            t.strip().lower() for v in headers.getall("Connection") for t in v.split(",")
        }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


async def proxy(request: web.Request) -> web.StreamResponse:
    base = request.app[UPSTREAMS].get(request.match_info["upstream"])
    if base is None:
        return web.Response(status=404, text="unknown upstream\n")
    raw = request.raw_path  # still encoded, with the query string
    rel = raw[len(request.match_info["upstream"]) + 2 :]
    has_body = request.body_exists
    async with request.app[SESSION].request(
        request.method,
        URL(base + "/" + rel, encoded=True),
        headers=_copy(request.headers, REQUEST_DROP),
        data=request.content if has_body else None,
        allow_redirects=False,
    ) as resp:
        out = web.StreamResponse(
            status=resp.status, reason=resp.reason, headers=_copy(resp.headers, RESPONSE_DROP)
        )
        if resp.content_length is not None:
            out.content_length = resp.content_length
        await out.prepare(request)
        async for chunk in resp.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0, ttl_dns_cache=300)
    app[SESSION] = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
    )
    try:
        yield
    finally:
        await app[SESSION].close()


def build_app(upstreams: dict[str, str]) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAMS] = upstreams
    app.cleanup_ctx.append(_session)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{upstream}/{path:.*}", proxy)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="an upstream, e.g. openai=http://127.0.0.1:9000 (repeatable)",
    )
    args = p.parse_args(argv)
    upstreams = {}
    for spec in args.upstream:
        name, sep, url = spec.partition("=")
        if not sep or not url.startswith(("http://", "https://")):
            p.error(f"--upstream takes NAME=URL, not {spec!r}")
        upstreams[name] = url.rstrip("/")
    if not upstreams:
        p.error("give at least one --upstream NAME=URL")
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    with contextlib.suppress(KeyboardInterrupt):
        web.run_app(
            build_app(upstreams),
            host=args.host,
            port=args.port,
            access_log=None,
            print=lambda *_: print(f"bare proxy listening on {args.host}:{args.port}", flush=True),
            loop=loop,
        )


if __name__ == "__main__":
    main()
