"""The fake upstream as the benchmark runs it: ``tests/fake_upstream.py`` with small
record buffers.

The fake keeps a record of every request (100,000 by default) and the last 1,000 raw
requests, for tests to inspect. Over a benchmark run that is hundreds of thousands of
objects, and each full garbage collection walks all of them (0.1 s per pass with
100,000 records, on an idle machine): p99 spikes of 300-700 ms hit whichever target
happened to be measured at the time. The benchmark never reads the records, so it keeps
only a few, and freezes start-up objects out of the collector.

One bench-only knob, for ``bench/streams.py``: a streamed request with the header
``X-Bench-Stamp: 1`` gets ``"x_bench_sent_ns":<time.monotonic_ns()>`` added to the JSON
of every content delta, taken just before the event is written to the socket. The
client subtracts it from its own ``monotonic_ns()`` when the bytes arrive (one clock,
one machine): the time a chunk spent between the fake and the client, i.e. whether a
proxy in between held it back. The header is not an ``X-Fake-*`` knob, so the fake of
the tests (``tests/fake_upstream.py``) behaves exactly as before; only this subclass
reads it.

    python bench/fake_server.py --port 9000 [--require-key sk-...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import gc
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from aiohttp import web
from fake_upstream import Event, FakeUpstream

STAMP_HEADER = "X-Bench-Stamp"
STAMP_FIELD = b"x_bench_sent_ns"

#: Set for the duration of one stamped stream, in that request's task: the base class
#: writes events through a static method that does not see the request.
_stamping: contextvars.ContextVar[bool] = contextvars.ContextVar("stamping", default=False)


def stamp(data: bytes) -> bytes:
    """``data`` (one framed SSE event) with the send time added as the last member of
    its JSON object."""
    end = data.rindex(b"}")
    return b'%s,"%s":%d%s' % (data[:end], STAMP_FIELD, time.monotonic_ns(), data[end:])


class BenchFake(FakeUpstream):
    """The fake upstream plus the ``X-Bench-Stamp`` knob (see the module docstring)."""

    async def _stream(self, request: web.Request, *args: Any) -> web.StreamResponse:
        if request.headers.get(STAMP_HEADER) != "1":
            return await super()._stream(request, *args)
        token = _stamping.set(True)
        try:
            return await super()._stream(request, *args)
        finally:
            _stamping.reset(token)

    @staticmethod
    async def _write_event(
        write: Callable[[bytes], Awaitable[None]], event: Event, record: dict[str, Any]
    ) -> None:
        if event.content_tokens is not None and _stamping.get():
            event = dataclasses.replace(event, data=stamp(event.data))
        await FakeUpstream._write_event(write, event, record)


async def serve(port: int, require_key: str | None) -> None:
    fake = BenchFake(require_key=require_key, max_records=1_000, max_requests=16)
    await fake.start("127.0.0.1", port)
    gc.collect()
    gc.freeze()
    print(f"fake upstream listening on {fake.url}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--require-key", default=None)
    args = p.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.port, args.require_key))


if __name__ == "__main__":
    main()
