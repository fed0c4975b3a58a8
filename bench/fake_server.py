"""The fake upstream as the benchmark runs it: ``tests/fake_upstream.py`` with small
record buffers.

The fake keeps a record of every request (100,000 by default) and the last 1,000 raw
requests, for tests to inspect. Over a benchmark run that is hundreds of thousands of
objects, and each full garbage collection walks all of them (0.1 s per pass with
100,000 records, on an idle machine): p99 spikes of 300-700 ms hit whichever target
happened to be measured at the time. The benchmark never reads the records, so it keeps
only a few, and freezes start-up objects out of the collector.

    python bench/fake_server.py --port 9000 [--require-key sk-...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_upstream import FakeUpstream


async def serve(port: int, require_key: str | None) -> None:
    fake = FakeUpstream(require_key=require_key, max_records=1_000, max_requests=16)
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
