"""The network edge towards providers: the shared upstream client, which headers cross
the proxy in each direction, and decoding a copy of compressed bodies.

Compression decision: the proxy relays the upstream's bytes *as they are*, compressed or
not, so the client receives exactly what the provider sent. To read usage it decodes a
copy (incrementally for streams). The ``Accept-Encoding`` sent upstream is the client's,
narrowed to the codings the proxy can decode (gzip, deflate, and br when a brotli
module is installed), so it never relays something it cannot meter. When the proxy must
edit a stream (removing the usage chunk it asked for), it asks for ``identity``.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping
from typing import Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.settings import UpstreamSettings
from proxy.upstream_client import Timeouts, UpstreamClient

try:  # brotli is optional: without it, "br" is simply not offered upstream.
    import brotli as _brotli
except ImportError:  # pragma: no cover - depends on the environment
    _brotli = None

#: Hop-by-hop headers (RFC 9110 §7.6.1) plus the ones the proxy always sets itself.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "authorization", "x-api-key", "expect"}
#: Request ``Content-Encoding``s that aiohttp's server decodes before the proxy reads the
#: body (aiohttp ``http_parser``: exactly these single tokens). The proxy forwards the
#: decoded bytes, so it must not forward the header: the upstream would try to decode
#: plain JSON again and fail.
SERVER_DECODED_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
DECODABLE = ("gzip", "deflate", "br") if _brotli is not None else ("gzip", "deflate")


def _drop_set(headers: CIMultiDictProxy[str], base: frozenset[str]) -> frozenset[str]:
    """``base`` plus the header names the sender listed in ``Connection``, which are
    hop-by-hop by declaration (RFC 9110 §7.6.1)."""
    if "Connection" not in headers:
        return base
    listed = {
        token.strip().lower()
        for value in headers.getall("Connection")
        for token in value.split(",")
        if token.strip()
    }
    return base | listed


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    auth: Mapping[str, str],
    *,
    identity_only: bool,
) -> CIMultiDict[str]:
    """The headers to send upstream: the client's, minus hop-by-hop headers, the
    caller's credentials and every ``X-Metergate-*`` header, plus the upstream ``auth``
    and a decodable ``Accept-Encoding``."""
    drop = _drop_set(incoming, _REQUEST_DROP)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in drop or lower.startswith("x-metergate-") or lower == "accept-encoding":
            continue
        if lower == "content-encoding" and value.strip().lower() in SERVER_DECODED_ENCODINGS:
            continue
        out.add(name, value)
    out.update(auth)
    out["Accept-Encoding"] = (
        "identity" if identity_only else narrow_accept_encoding(incoming.get("Accept-Encoding"))
    )
    return out


def narrow_accept_encoding(value: str | None) -> str:
    """The client's ``Accept-Encoding`` restricted to codings the proxy can decode."""
    if not value:
        return "identity"
    kept = []
    for part in value.split(","):
        coding = part.split(";", 1)[0].strip().lower()
        if coding in DECODABLE or coding == "identity":
            kept.append(part.strip())
    return ", ".join(kept) if kept else "identity"


def client_response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop ones (lengths are recomputed)."""
    out: CIMultiDict[str] = CIMultiDict(upstream)  # copied in C, then a few deletions
    for name in _drop_set(upstream, _RESPONSE_DROP):
        if name in out:
            del out[name]
    return out


class Decoder(Protocol):
    """Incremental decoder of one ``Content-Encoding``."""

    def decompress(self, data: bytes) -> bytes: ...


class _Identity:
    def decompress(self, data: bytes) -> bytes:
        return data


def decoder_for(content_encoding: str | None) -> Decoder | None:
    """A fresh incremental decoder, ``_Identity`` for none, None when unsupported."""
    coding = (content_encoding or "identity").strip().lower()
    if coding in ("", "identity"):
        return _Identity()
    if coding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if coding == "deflate":
        return _Deflate()
    if coding == "br" and _brotli is not None:
        return _brotli.Decompressor()  # type: ignore[no-any-return]
    return None


class _Deflate:
    """``deflate`` is zlib-wrapped by the RFC, but some servers send raw deflate."""

    def __init__(self) -> None:
        self._obj: Any = None
        self._first = b""

    def decompress(self, data: bytes) -> bytes:
        if self._obj is None:
            self._first += data
            if len(self._first) < 2:
                return b""
            is_zlib = (self._first[0] & 0x0F) == 8 and int.from_bytes(
                self._first[:2], "big"
            ) % 31 == 0
            self._obj = zlib.decompressobj(zlib.MAX_WBITS if is_zlib else -zlib.MAX_WBITS)
            data, self._first = self._first, b""
        return bytes(self._obj.decompress(data))


def decode_body(body: bytes, content_encoding: str | None) -> bytes | None:
    """A decoded copy of a whole body, or None when it cannot be decoded."""
    decoder = decoder_for(content_encoding)
    if decoder is None:
        return None
    try:
        return decoder.decompress(body)
    except Exception:  # zlib.error, brotli.error: a corrupt body is unmeterable, not fatal
        return None


def make_client(upstreams: Mapping[str, UpstreamSettings]) -> UpstreamClient:
    """The one client all upstream requests share (:mod:`proxy.upstream_client`).

    The pool is sized from config (a default of 100 would queue long streams);
    responses are never decompressed (we relay bytes as received); redirects are not
    followed (an upstream cannot send the proxy elsewhere); no cookies, no proxy from
    the environment.
    """
    return UpstreamClient(limit=sum(u.pool_size for u in upstreams.values()) or 1024)


@functools.lru_cache(maxsize=64)
def request_timeouts(upstream: UpstreamSettings) -> Timeouts:
    """Bound the connect and every read gap, never the whole request: reasoning
    streams may legitimately run for many minutes."""
    return Timeouts(connect=upstream.connect_timeout_s, read=upstream.read_timeout_s)
