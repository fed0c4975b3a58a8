"""500 concurrent slow streams through the bare hop and Metergate: is any chunk held back?

Issue 6 asks for "500 concurrent slow streams (5 ms between chunks) relayed with no
chunk held back". This measures it rather than assuming it: the fake upstream
(bench/fake_server.py, ``X-Bench-Stamp: 1``) writes its ``monotonic_ns()`` into every
content delta just before sending it, and the client subtracts that from its own clock
when the bytes arrive. That *relay delay* is what a proxy adds to each chunk; a proxy
that buffered would show it as a delay of a whole chunk interval or more, and as gaps
near zero between chunks that should be 5 ms apart.

Targets, as in bench/run.py (whose process helpers this reuses): ``direct`` (client →
fake, the baseline: what the client and the fake themselves cost), ``bare``
(bench/bare_proxy.py) and ``metergate`` (``metergate serve``, embedded SQLite store,
access log on). Each round opens N streamed chat completions at once (OpenAI wire
format, ``stream: true``, ``stream_options.include_usage``), each of C content deltas
``--delay-ms`` apart, on one target after the other, the order rotating per round; one
unmeasured round per target first opens the connection pools.

    .venv/bin/python bench/streams.py                  # 500 x 40 chunks, 3 rounds, < 1 min
    .venv/bin/python bench/streams.py --chunks 400     # long streams: the steady state
    .venv/bin/python bench/streams.py --streams 200 --targets bare,nginx,metergate

The rig (``--rig``): by default ``bench/streamrig.c``, built with ``cc`` into the run's
temp dir, is both the fake upstream and the client: one epoll loop each, in C, so that
500 streams at 5 ms (100,000 chunks/s) are really produced and read; the aiohttp fake
and client that share the other core (``--rig python``) top out near 20,000 chunks/s,
too slow to load a proxy at the target rate. ``nginx`` (a target of bench/run.py) is
the reference for what a hop written in C needs to relay that rate.

Before starting it waits (up to ``--wait-tests`` s, checking every 15 s) until no
``pytest`` runs, and it reports how much CPU other processes used during each round.
Everything it starts it stops, by PID, in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import run
from loadgen import pct

RIG_SOURCE = Path(__file__).with_name("streamrig.c")
STAMP_RE = re.compile(rb'"x_bench_sent_ns":(\d+)')
TEST_PATTERN = "pytest"


# ------------------------------------------------------------------ shared helpers
def wait_for_tests(max_wait: float, every: float = 15.0) -> str:
    """Wait until no ``pytest`` process runs (someone's test suite would distort the
    numbers), checking every ``every`` s for up to ``max_wait`` s; say what happened."""
    t0 = time.monotonic()
    while True:
        cp = subprocess.run(["pgrep", "-f", TEST_PATTERN], capture_output=True, text=True)
        pids = [p for p in cp.stdout.split() if int(p) != os.getpid()]
        waited = time.monotonic() - t0
        if not pids:
            return f"no pytest running at start (waited {waited:.0f} s)"
        if waited >= max_wait:
            return f"WARNING: pytest still running after {waited:.0f} s (PIDs {' '.join(pids)})"
        print(f"waiting for pytest ({' '.join(pids)}) to finish ...", flush=True)
        time.sleep(every)


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and every process below it (the token-counting child)."""
    total = 0.0
    for p in [pid, *run.descendants(pid)]:
        try:
            total += run.cpu_seconds(p)
        except OSError:
            pass
    return total


def tree_rss_kib(pid: int, field_name: str = "VmRSS") -> tuple[int, int, int]:
    """(the process's, its descendants' summed, number of descendants) ``field_name``."""
    kids = run.descendants(pid)
    total = 0
    for k in kids:
        try:
            total += run.proc_status_kib(k, field_name)
        except OSError:
            pass
    return run.proc_status_kib(pid, field_name), total, len(kids)


def ms(ns: float) -> float:
    return ns / 1e6


# --------------------------------------------------------------------- one stream
@dataclass
class Round:
    """What one round of N streams against one target gave."""

    target: str
    streams: int
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    delays: list[int] = field(default_factory=list)  # ns, fake send → client receive
    recv_gaps: list[int] = field(default_factory=list)  # ns between a stream's chunks
    sent_gaps: list[int] = field(default_factory=list)  # ns, as the fake sent them
    first_chunk: list[int] = field(default_factory=list)  # ns from request start
    #: per stream, (send times, receive times) of its chunks
    streams_seen: list[tuple[list[int], list[int]]] = field(default_factory=list)
    overtaken: int = 0
    open_now: int = 0
    open_max: int = 0
    wall_s: float = 0.0
    proxy_cpu_pct: float | None = None
    foreign_cpu_pct: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def add_chunks(self, start: int, sent: list[int], recv: list[int]) -> None:
        """One stream's chunks: when the fake sent each, when the client had it."""
        self.chunks += len(recv)
        self.delays.extend(b - a for a, b in zip(sent, recv, strict=True))
        # still on its way when the fake sent the next one: held back by a chunk or more
        self.overtaken += sum(1 for k in range(len(sent) - 1) if recv[k] > sent[k + 1])
        self.recv_gaps.extend(b - a for a, b in itertools.pairwise(recv))
        self.sent_gaps.extend(b - a for a, b in itertools.pairwise(sent))
        if recv:
            self.first_chunk.append(recv[0] - start)
            self.streams_seen.append((sent, recv))

    def finish(self, args: argparse.Namespace, chunks: int, done: bool, usage: bool) -> None:
        if not done or not usage or chunks != args.chunks:
            self.error(f"incomplete ({chunks} chunks, done={done}, usage={usage})")
        else:
            self.ok += 1

    def steady(self) -> tuple[list[int], int]:
        """Relay delays, and chunks overtaken by the next, of the chunks sent once every
        stream had its first chunk: the start of a round is a burst of N new requests
        that the proxy parses, meters and connects upstream, and chunks of the streams
        already open queue behind that work; after it, the proxy only relays."""
        if len(self.streams_seen) < self.streams:
            return [], 0
        all_open = max(recv[0] for _, recv in self.streams_seen)
        delays: list[int] = []
        overtaken = 0
        for sent, recv in self.streams_seen:
            for k, t in enumerate(sent):
                if t > all_open:
                    delays.append(recv[k] - t)
                    overtaken += k + 1 < len(sent) and recv[k] > sent[k + 1]
        return delays, overtaken


def stream_body(i: int) -> bytes:
    return json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"Tell me a story, number {i}."}],
            "max_tokens": 512,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


async def one_stream(
    session: aiohttp.ClientSession, t: run.Target, i: int, args: argparse.Namespace, r: Round
) -> None:
    headers = t.headers(
        {
            "X-Fake-Chunks": str(args.chunks),
            "X-Fake-Output": str(args.chunks),  # one token, so one word, per delta
            "X-Fake-Chunk-Delay-Ms": str(args.delay_ms),
            "X-Bench-Stamp": "1",
        }
    )
    start = time.monotonic_ns()
    recv: list[int] = []
    sent: list[int] = []
    done = usage = False
    opened = False
    try:
        async with session.post(t.url(), data=stream_body(i), headers=headers) as resp:
            if resp.status != 200:
                await resp.read()
                r.error(f"http {resp.status}")
                return
            opened = True
            r.open_now += 1
            r.open_max = max(r.open_max, r.open_now)
            buf = b""
            async for data in resp.content.iter_any():
                now = time.monotonic_ns()
                buf += data
                end = buf.rfind(b"\n\n")
                if end < 0:
                    continue
                whole, buf = buf[: end + 2], buf[end + 2 :]
                for m in STAMP_RE.finditer(whole):
                    sent.append(int(m.group(1)))
                    recv.append(now)
                if b'"usage":{' in whole:
                    usage = True
                if b"data: [DONE]" in whole:
                    done = True
    except (TimeoutError, aiohttp.ClientError) as exc:
        r.error(type(exc).__name__)
        return
    finally:
        if opened:
            r.open_now -= 1
        r.add_chunks(start, sent, recv)
    r.finish(args, len(recv), done, usage)


@contextlib.contextmanager
def measured(b: run.Bench, t: run.Target, args: argparse.Namespace) -> Iterator[Round]:
    """A round against ``t``: its wall time, the proxy's CPU and other processes' CPU."""
    r = Round(t.name, args.streams)
    begin = b.foreign_begin()
    cpu0 = tree_cpu_seconds(t.proc.pid) if t.proc else 0.0
    t0 = time.monotonic()
    yield r
    r.wall_s = time.monotonic() - t0
    if t.proc:
        r.proxy_cpu_pct = (tree_cpu_seconds(t.proc.pid) - cpu0) / r.wall_s * 100
    b.foreign_end(t.name, "streams", begin)
    r.foreign_cpu_pct = b.raw[t.name]["streams_foreign_cpu_pct"][-1]


async def one_round(
    session: aiohttp.ClientSession, b: run.Bench, t: run.Target, args: argparse.Namespace
) -> Round:
    with measured(b, t, args) as r:
        await asyncio.wait_for(
            asyncio.gather(*(one_stream(session, t, i, args, r) for i in range(args.streams))),
            timeout=args.round_timeout,
        )
    return r


def rounds_plan(b: run.Bench, args: argparse.Namespace) -> Iterator[tuple[str, str, bool]]:
    """(round label, target, warm-up?) in order: one warm-up per target, then the
    measured rounds with the order of the targets rotating."""
    names = list(b.targets)
    for name in names:
        yield "warm-up (cold connections)", name, True
    for rnd in range(args.rounds):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            yield f"round {rnd + 1}", name, False


def warm_args(args: argparse.Namespace) -> argparse.Namespace:
    """Open the pools, client → proxy and proxy → fake, to N connections each: slower
    chunks, so that all N streams overlap (else a measured round opens the rest, and
    connects beyond a listen backlog of 128 wait a SYN retry of 1 s)."""
    return argparse.Namespace(**{**vars(args), "delay_ms": max(25, args.delay_ms)})


async def measure(b: run.Bench, args: argparse.Namespace) -> list[Round]:
    out: list[Round] = []
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=120)
    timeout = aiohttp.ClientTimeout(total=args.round_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for label, name, warm in rounds_plan(b, args):
            r = await one_round(session, b, b.targets[name], warm_args(args) if warm else args)
            print(f"  {label} {row(r)}", flush=True)
            if not warm:
                out.append(r)
    return out


# ------------------------------------------------------------------ the native rig
class NativeClient:
    """A ``bench/streamrig.c`` client for one target: a process of its own on the load
    CPUs, keeping its connections from round to round, driven by lines on stdin."""

    def __init__(self, exe: Path, t: run.Target, cpus: set[int]) -> None:
        url = urllib.parse.urlsplit(t.url())
        self.popen = subprocess.Popen(
            [str(exe), "client", str(url.port), url.path, t.auth],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )

    def round(self, r: Round, args: argparse.Namespace, out: Path) -> None:
        """One round of ``args.streams`` streams; their chunks into ``r``."""
        assert self.popen.stdin is not None and self.popen.stdout is not None
        timeout = max(1, round(args.round_timeout))
        command = f"round {args.streams} {args.chunks} {args.delay_ms} {timeout} {out}\n"
        self.popen.stdin.write(command)
        self.popen.stdin.flush()
        answer = self.popen.stdout.readline().strip()
        if answer != "ok":
            raise RuntimeError(f"streamrig client: {answer or 'exited'}")
        spans: list[tuple[int, int]] = []
        with open(out) as f:
            lines = iter(f)
            for line in lines:
                _, _, status, start, done, usage, n = line.split()
                pairs = [next(lines).split() for _ in range(int(n))]
                sent = [int(a) for a, _ in pairs]
                recv = [int(b) for _, b in pairs]
                if status != "200":
                    r.error("connection failed" if status == "-1" else f"http {status}")
                    continue
                r.add_chunks(int(start), sent, recv)
                r.finish(args, len(recv), done == "1", usage == "1")
                if recv:
                    spans.append((recv[0], recv[-1]))
        r.open_max = most_at_once(spans)

    def close(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.close()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)


def most_at_once(spans: list[tuple[int, int]]) -> int:
    """The most streams that were between their first and last chunk at one time."""
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = best = 0
    for _, step in edges:
        now += step
        best = max(best, now)
    return best


def build_rig(tmp: Path) -> Path:
    exe = tmp / "streamrig"
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-o", str(exe), str(RIG_SOURCE)], check=True)
    return exe


def measure_native(b: run.Bench, args: argparse.Namespace, exe: Path) -> list[Round]:
    out: list[Round] = []
    clients = {name: NativeClient(exe, t, b.load_cpus) for name, t in b.targets.items()}
    try:
        b.pids.extend(c.popen.pid for c in clients.values())
        for k, (label, name, warm) in enumerate(rounds_plan(b, args)):
            with measured(b, b.targets[name], args) as r:
                clients[name].round(r, warm_args(args) if warm else args, b.tmp / f"round{k}.txt")
            print(f"  {label} {row(r)}", flush=True)
            if not warm:
                out.append(r)
    finally:
        for c in clients.values():
            c.close()
    return out


# ------------------------------------------------------------------------ report
def row(r: Round) -> str:
    d = sorted(r.delays)
    cpu = "—" if r.proxy_cpu_pct is None else f"{r.proxy_cpu_pct:.0f}%"
    return (
        f"{r.target}: {r.ok}/{r.streams} ok, {r.wall_s:.2f} s, open max {r.open_max}, "
        f"relay p50 {ms(pct(d, 50)):.2f} p99 {ms(pct(d, 99)):.2f} max {ms(d[-1] if d else 0):.2f} "
        f"ms, first chunk p99 {ms(pct(sorted(r.first_chunk), 99)):.0f} ms, "
        f"{r.chunks / r.wall_s:.0f} chunks/s, proxy CPU {cpu}, others {r.foreign_cpu_pct:.0f}%"
    )


def summarise(rounds: list[Round], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    interval = args.delay_ms * 1e6
    for name in dict.fromkeys(r.target for r in rounds):
        rs = [r for r in rounds if r.target == name]
        d = sorted(x for r in rs for x in r.delays)
        g = sorted(x for r in rs for x in r.recv_gaps)
        s = sorted(x for r in rs for x in r.sent_gaps)
        steady = [r.steady() for r in rs]
        sd = sorted(x for delays, _ in steady for x in delays)
        f = sorted(x for r in rs for x in r.first_chunk)
        errors: dict[str, int] = {}
        for r in rs:
            for k, v in r.errors.items():
                errors[k] = errors.get(k, 0) + v
        cpus = [r.proxy_cpu_pct for r in rs if r.proxy_cpu_pct is not None]
        out[name] = {
            "streams": sum(r.streams for r in rs),
            "completed": sum(r.ok for r in rs),
            "errors": errors,
            "chunks": len(d),
            "chunks_expected": sum(r.streams for r in rs) * args.chunks,
            "open_max": min(r.open_max for r in rs),
            "relay_p50_ms": ms(pct(d, 50)),
            "relay_p99_ms": ms(pct(d, 99)),
            "relay_max_ms": ms(d[-1]) if d else None,
            "late_1_interval": sum(1 for x in d if x > interval),
            "late_50ms": sum(1 for x in d if x > 50e6),
            "overtaken": sum(r.overtaken for r in rs),
            "steady_chunks": len(sd),
            "steady_p50_ms": ms(pct(sd, 50)),
            "steady_p99_ms": ms(pct(sd, 99)),
            "steady_max_ms": ms(sd[-1]) if sd else None,
            "steady_overtaken": sum(o for _, o in steady),
            "chunk_rate": min(r.chunks / r.wall_s for r in rs),
            "gap_p1_ms": ms(pct(g, 1)),
            "gap_p50_ms": ms(pct(g, 50)),
            "gap_p99_ms": ms(pct(g, 99)),
            "gap_max_ms": ms(g[-1]) if g else None,
            "gaps_under_1ms": sum(1 for x in g if x < 1e6),
            "fake_gap_p50_ms": ms(pct(s, 50)),
            "fake_gap_p99_ms": ms(pct(s, 99)),
            "first_chunk_p50_ms": ms(pct(f, 50)),
            "first_chunk_p99_ms": ms(pct(f, 99)),
            "round_wall_s": max(r.wall_s for r in rs),
            "proxy_cpu_pct": max(cpus) if cpus else None,
            "foreign_cpu_pct_max": max(r.foreign_cpu_pct for r in rs),
        }
    return out


ROWS = [
    ("streams completed / opened", "{completed}/{streams}"),
    ("chunks received / expected", "{chunks}/{chunks_expected}"),
    ("streams open at once (min over rounds)", "{open_max}"),
    ("relay delay per chunk p50, ms", "{relay_p50_ms:.2f}"),
    ("relay delay per chunk p99, ms", "{relay_p99_ms:.2f}"),
    ("relay delay per chunk max, ms", "{relay_max_ms:.2f}"),
    ("chunks delayed > --delay-ms", "{late_1_interval}"),
    ("chunks delayed > 50 ms", "{late_50ms}"),
    ("chunks arriving after the fake sent the next", "{overtaken}"),
    ("once all streams were open: chunks", "{steady_chunks}"),
    ("  relay delay p50 / p99, ms", "{steady_p50_ms:.2f} / {steady_p99_ms:.2f}"),
    ("  relay delay max, ms", "{steady_max_ms:.2f}"),
    ("  chunks arriving after the next was sent", "{steady_overtaken}"),
    ("gap between chunks p1, ms", "{gap_p1_ms:.2f}"),
    ("gap between chunks p50, ms", "{gap_p50_ms:.2f}"),
    ("gap between chunks p99, ms", "{gap_p99_ms:.2f}"),
    ("gap between chunks max, ms", "{gap_max_ms:.2f}"),
    ("gaps < 1 ms (chunks arriving together)", "{gaps_under_1ms}"),
    ("fake's own gap p50 / p99, ms", "{fake_gap_p50_ms:.2f} / {fake_gap_p99_ms:.2f}"),
    ("time to first chunk p50 / p99, ms", "{first_chunk_p50_ms:.1f} / {first_chunk_p99_ms:.1f}"),
    ("round wall time (max), s", "{round_wall_s:.2f}"),
    ("chunks relayed per s (min over rounds)", "{chunk_rate:.0f}"),
    ("proxy CPU busy (max over rounds)", "{proxy_cpu}"),
    ("proxy peak RSS (VmHWM), MiB", "{rss_peak}"),
    ("  its children, peak RSS sum, MiB", "{rss_children}"),
    ("other processes, max % of a CPU", "{foreign_cpu_pct_max:.0f}"),
]


def render(summary: dict[str, dict[str, Any]]) -> str:
    names = list(summary)
    cells: list[list[str]] = [["metric (all measured rounds pooled)", *names]]
    for label, fmt in ROWS:
        line = [label]
        for n in names:
            s = dict(summary[n])
            s["proxy_cpu"] = "—" if s["proxy_cpu_pct"] is None else f"{s['proxy_cpu_pct']:.0f}%"
            for k in ("rss_peak", "rss_children"):
                s[k] = "—" if s.get(k) is None else f"{s[k]:.1f}"
            try:
                line.append(fmt.format(**s))
            except (TypeError, ValueError):
                line.append("—")
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = []
    for k, c in enumerate(cells):
        lines.append(
            "  ".join(
                c[0].ljust(widths[0]) if i == 0 else c[i].rjust(widths[i]) for i in range(len(c))
            )
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=500, help="concurrent streams per round")
    p.add_argument("--chunks", type=int, default=40, help="content deltas per stream")
    p.add_argument("--delay-ms", type=int, default=5, help="pause between deltas")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per target")
    p.add_argument("--targets", default="direct,bare,metergate")
    p.add_argument("--round-timeout", type=float, default=60.0, help="seconds per round")
    p.add_argument("--wait-tests", type=float, default=900.0, help="wait for pytest, s")
    p.add_argument("--wait-quiet", type=float, default=0.0, help="see bench/run.py")
    for name in ("proxy", "fake", "load"):
        p.add_argument(f"--{name}-cpus", help="see bench/run.py")
    p.add_argument(
        "--rig",
        choices=("native", "python"),
        default="native",
        help="fake upstream and client: bench/streamrig.c (built with $CC, default cc), "
        "which keeps up with 500 streams at 5 ms, or aiohttp (~20,000 chunks/s at most)",
    )
    p.add_argument(
        "--base-rev",
        help="see bench/run.py: the metergate-base target (add it to --targets) runs this commit",
    )
    p.add_argument("--keep-tmp", action="store_true")
    return p.parse_args(argv)


def run_args(args: argparse.Namespace) -> argparse.Namespace:
    """bench/run.py's own arguments, so that its start-up helpers can be reused."""
    argv = ["--targets", args.targets, "--no-wrk", "--wait-quiet", str(args.wait_quiet)]
    for name in ("proxy", "fake", "load"):
        if getattr(args, f"{name}_cpus"):
            argv += [f"--{name}-cpus", getattr(args, f"{name}_cpus")]
    if args.base_rev:
        argv += ["--base-rev", args.base_rev]
    return run.parse_args(argv)


def event_loop_runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # pragma: no cover
        return asyncio.run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    waited = wait_for_tests(args.wait_tests)
    print(waited, flush=True)
    rargs = run_args(args)
    pin = run.choose_pinning(rargs)
    os.sched_setaffinity(0, pin.load)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = datetime.now(UTC)
    tmp = Path(tempfile.mkdtemp(prefix="metergate-streams-"))
    procs: list[run.Proc] = []
    try:
        exe = build_rig(tmp) if args.rig == "native" else None
        fake_argv = None if exe is None else [str(exe), "fake"]
        fake, tmap, _ = run.start_targets(rargs, tmp, pin, procs, fake_argv)
        pids = [p.pid for p in procs]
        # No load-generator process: this harness is the client (pinned to the load CPUs).
        b = run.Bench(rargs, tmp, pin.load, fake, tmap, None, None, pin.proxy, pids)  # type: ignore[arg-type]
        print(
            f"pinning: {pin.describe()} ({pin.why}); {args.streams} streams x {args.chunks} "
            f"chunks {args.delay_ms} ms apart; {args.rounds} round(s)",
            flush=True,
        )
        t0 = time.monotonic()
        if exe is not None:
            rounds = measure_native(b, args, exe)
        else:
            rounds = event_loop_runner()(measure(b, args))
        elapsed = time.monotonic() - t0
        summary = summarise(rounds, args)
        for name, t in tmap.items():
            if t.proc is not None:
                summary[name]["rss_peak"] = run.proc_status_kib(t.proc.pid, "VmHWM") / 1024
                summary[name]["rss_children"] = run.children_peak_kib(t.proc.pid) / 1024
        header = (
            f"Streams bench {started:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s; {os.cpu_count()} CPUs; "
            f"Metergate {rargs.metergate_version} (store sqlite, access log on)\n"
            f"pinning: {pin.describe()}; {args.streams} concurrent streams x {args.chunks} "
            f"chunks {args.delay_ms} ms apart (OpenAI chat, include_usage; {args.rig} rig); "
            f"{args.rounds} measured round(s) per target after one warm-up\n{waited}"
        )
        table = render(summary)
        print(f"\n{header}\n{table}")
        for name, s in summary.items():
            if s["errors"]:
                print(f"ERRORS {name}: {s['errors']}")
        run.RESULTS.mkdir(parents=True, exist_ok=True)
        out = run.RESULTS / f"streams-{started:%Y%m%d-%H%M%S}.json"
        out.write_text(
            json.dumps(
                {"args": vars(args), "summary": summary, "table": f"{header}\n{table}"},
                indent=2,
                default=str,
            )
        )
        print(f"\nJSON: {out.relative_to(run.ROOT)}")
        return 0
    finally:
        run.stop_all(procs, tmp, keep_tmp=args.keep_tmp)


if __name__ == "__main__":
    sys.exit(main())
