"""The load generator of the benchmark, as its own process.

``bench/run.py`` starts ``python bench/loadgen.py`` pinned to the load CPU and drives it
with one JSON command per line on stdin; each answer is one JSON line on stdout. It uses
aiohttp (and uvloop when installed), like the clients of a real deployment.

Commands (``op``):

- ``paced``: open loop. Requests start at fixed intervals (``rate`` per second for
  ``warmup + duration`` seconds) whatever the answers do, so a slow target cannot slow
  the arrivals down (no coordinated omission). Latency is measured from the moment
  each request is started; how late the generator itself was is reported as
  ``gen_lateness_p99_ms``. With ``heavy``, requests with a 1 MiB prompt are paced at
  ``heavy.rate`` alongside (alternately non-streamed and streamed).
- ``ttfb``: ``n`` sequential streamed requests; time to the first ``data:`` event and to
  the end of the stream.
- ``closed``: ``connections`` concurrent loops for ``duration`` seconds (max throughput
  when ``wrk`` is not installed).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp

#: Size of the prompt text of the "big" requests.
BIG_PROMPT_BYTES = 1024 * 1024

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when "
    "what will more if no out so said can who them some could time these two may then do "
    "first any my now such like our over man me even most made after also did many before "
    "must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three invoice budget token "
    "latency proxy request stream model price ledger report cluster replica contract"
).split()


def pct(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linear interpolation."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def big_prompt(size: int) -> str:
    rnd = random.Random(42)
    parts: list[str] = []
    n = 0
    while n < size:
        w = rnd.choice(_WORDS)
        parts.append(w)
        n += len(w) + 1
    return " ".join(parts)[:size]


def big_body(size: int, stream: bool) -> bytes:
    obj: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Summarise the document below in three bullets."},
            {"role": "user", "content": big_prompt(size)},
        ],
        "max_tokens": 256,
    }
    if stream:
        obj["stream"] = True
    return json.dumps(obj, separators=(",", ":")).encode()


async def _op_paced(cmd: dict[str, Any]) -> dict[str, Any]:
    """Open loop: requests start at fixed intervals whatever the answers do."""

    rate, duration, warmup = cmd["rate"], cmd["duration"], cmd["warmup"]
    body = cmd["body"].encode()
    headers = cmd["headers"]
    heavy = cmd.get("heavy")
    conn = aiohttp.TCPConnector(limit=512)
    timeout = aiohttp.ClientTimeout(total=30)
    results: list[tuple[float, float, float, bool]] = []
    heavy_results: list[tuple[float, bool]] = []
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def one(t_sched: float) -> None:
            t_start = time.perf_counter()
            ok = False
            try:
                async with session.post(cmd["url"], data=body, headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            results.append((t_sched, t_start, time.perf_counter(), ok))

        async def one_heavy(data: bytes) -> None:
            t_start = time.perf_counter()
            ok = False
            try:
                async with session.post(heavy["url"], data=data, headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            heavy_results.append((time.perf_counter() - t_start, ok))

        async def pace(n: int, interval: float, t0: float, fn: Callable[[int, float], Any]) -> None:
            tasks = []
            for i in range(n):
                t_sched = t0 + i * interval
                delay = t_sched - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(fn(i, t_sched)))
            await asyncio.gather(*tasks)

        t0 = time.perf_counter() + 0.05
        n = int((warmup + duration) * rate)
        jobs = [pace(n, 1.0 / rate, t0, lambda i, ts: one(ts))]
        if heavy:
            bodies = [big_body(heavy["size"], False), big_body(heavy["size"], True)]
            hn = int((warmup + duration) * heavy["rate"])
            jobs.append(
                pace(hn, 1.0 / heavy["rate"], t0 + 0.01, lambda i, ts: one_heavy(bodies[i % 2]))
            )
        await asyncio.gather(*jobs)
    t_measure = t0 + warmup
    kept = [r for r in results if r[0] >= t_measure]
    lat = sorted((end - start) * 1000 for _, start, end, ok in kept if ok)
    lateness = sorted((start - sched) * 1000 for sched, start, _, _ in kept)
    out: dict[str, Any] = {
        "n": len(kept),
        "errors": sum(1 for r in kept if not r[3]),
        "p50_ms": pct(lat, 50),
        "p90_ms": pct(lat, 90),
        "p99_ms": pct(lat, 99),
        "max_ms": lat[-1] if lat else float("nan"),
        "gen_lateness_p99_ms": pct(lateness, 99),
        "sent_total": len(results),
    }
    if heavy:
        hl = sorted(d * 1000 for d, ok in heavy_results if ok)
        out["heavy_n"] = len(heavy_results)
        out["heavy_errors"] = sum(1 for _, ok in heavy_results if not ok)
        out["heavy_p50_ms"] = pct(hl, 50)
    return out


async def _op_ttfb(cmd: dict[str, Any]) -> dict[str, Any]:
    """Sequential streamed requests: time to the first ``data:`` event, and to the end."""

    body = cmd["body"].encode()
    first: list[float] = []
    total: list[float] = []
    events: Counter[int] = Counter()
    errors = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for _ in range(cmd["n"]):
            t0 = time.perf_counter()
            t_first = None
            count = 0
            try:
                async with session.post(cmd["url"], data=body, headers=cmd["headers"]) as r:
                    async for line in r.content:
                        if line.startswith(b"data:"):
                            count += 1
                            if t_first is None:
                                t_first = time.perf_counter()
                    ok = r.status == 200 and t_first is not None
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if not ok or t_first is None:
                errors += 1
                continue
            first.append((t_first - t0) * 1000)
            total.append((time.perf_counter() - t0) * 1000)
            events[count] += 1
    return {
        "n": len(first),
        "errors": errors,
        "ttfb_median_ms": statistics.median(first) if first else float("nan"),
        "ttfb_p90_ms": pct(sorted(first), 90),
        "total_median_ms": statistics.median(total) if total else float("nan"),
        "events": {str(k): v for k, v in events.items()},
    }


async def _op_closed(cmd: dict[str, Any]) -> dict[str, Any]:
    """Closed loop at fixed concurrency for max throughput (used when wrk is missing)."""

    body = cmd["body"].encode()
    done = 0
    errors = 0
    lat: list[float] = []
    conn = aiohttp.TCPConnector(limit=cmd["connections"])
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        deadline = time.perf_counter() + cmd["duration"]

        async def worker() -> None:
            nonlocal done, errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    async with session.post(cmd["url"], data=body, headers=cmd["headers"]) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                done += 1
                lat.append(time.perf_counter() - t0)

        t_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(cmd["connections"])))
        elapsed = time.perf_counter() - t_start
    lat.sort()
    return {
        "requests": done,
        "errors": errors,
        "seconds": elapsed,
        "rps": done / elapsed,
        "p50_ms": pct(lat, 50) * 1000,
        "p99_ms": pct(lat, 99) * 1000,
    }


def worker_main() -> int:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    ops = {"paced": _op_paced, "ttfb": _op_ttfb, "closed": _op_closed}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            out = loop.run_until_complete(ops[cmd["op"]](cmd))
        except Exception as exc:  # report, don't die: the harness decides
            out = {"failed": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main())
