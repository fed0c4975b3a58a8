"""Ten minutes of mixed traffic through ``metergate serve``: does its memory stay flat?

Issue 6 asks for "peak RSS ≤ 100 MB under that load, flat (±10%) over a 10-minute soak
of mixed traffic". This starts the fake upstream (bench/fake_server.py) and one
Metergate (embedded SQLite store, access log on, metrics on, the three budgets of
bench/run.py's budgets target: two hard monthly caps and a requests-per-minute limit,
all far above what the soak spends), and sends an open-loop stream of requests at
``--rate`` per second (arrivals do not wait for answers) drawn from this mix:

    chat            35%  OpenAI chat, non-streamed
    chat-stream     20%  OpenAI chat streamed, 8 deltas 10 ms apart (half of them
                         without include_usage, which Metergate then adds)
    messages        15%  Anthropic messages, non-streamed
    messages-stream 15%  Anthropic messages streamed, 8 deltas 10 ms apart
    chat-cut         5%  OpenAI stream cut after 4 deltas (no usage: Metergate estimates,
                         which starts its token-counting child process)
    messages-cut     3%  the same for Anthropic
    chat-body-cut    2%  non-streamed answer cut half-way (an upstream failure)
    unknown-key      5%  a key Metergate does not know: refused with 401

Every ``--sample-s`` seconds it samples the RSS of the proxy process and of its children
(the token-counting child, multiprocessing's resource tracker) from /proc, the proxy's
CPU, other processes' CPU and whether a ``pytest`` runs. At the end: the table of
samples; peak RSS; flatness = (max - min) / min of the samples after the warm-up (2 of
10 minutes), for the proxy process and for the total with its children; the ledger's
rows against the requests sent.

    .venv/bin/python bench/soak.py                 # 10 minutes at 200 req/s
    .venv/bin/python bench/soak.py --minutes 1     # a short try (warm-up 1/5 of it)

Everything it starts it stops, by PID, in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import run
from loadgen import pct
from streams import TEST_PATTERN, event_loop_runner, tree_cpu_seconds, tree_rss_kib, wait_for_tests

MIB = 1024.0
PHRASES = (
    "Which documents do I need to fly from Paris to Toronto?",
    "Summarise the attached invoice in two lines.",
    "Write a haiku about a proxy that counts tokens.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Explain the difference between a budget reservation and a settlement.",
)
STREAM_KNOBS = {"X-Fake-Chunks": "8", "X-Fake-Chunk-Delay-Ms": "10"}
CUT_KNOBS = {**STREAM_KNOBS, "X-Fake-Fault": "cut", "X-Fake-Fault-After": "4"}


@dataclass(frozen=True)
class Kind:
    name: str
    weight: int
    provider: str  # "openai" or "anthropic"
    stream: bool
    knobs: dict[str, str] = field(default_factory=dict)
    bad_key: bool = False
    include_usage: bool = True


MIX = (
    Kind("chat", 35, "openai", False),
    Kind("chat-stream", 20, "openai", True, STREAM_KNOBS),
    Kind("messages", 15, "anthropic", False),
    Kind("messages-stream", 15, "anthropic", True, STREAM_KNOBS),
    Kind("chat-cut", 5, "openai", True, CUT_KNOBS),
    Kind("messages-cut", 3, "anthropic", True, CUT_KNOBS),
    Kind("chat-body-cut", 2, "openai", False, {"X-Fake-Fault": "cut"}),
    Kind("unknown-key", 5, "openai", False, bad_key=True),
)


def request_for(kind: Kind, i: int, root: str) -> tuple[str, dict[str, str], bytes]:
    """URL, headers and body of request number ``i`` of ``kind``."""
    text = f"{PHRASES[i % len(PHRASES)]} (request {i})" + " Please be brief." * (i % 7)
    key = "mg-unknown-0000000000" if kind.bad_key else run.METERGATE_KEY
    headers = {"Content-Type": "application/json", **kind.knobs}
    obj: dict[str, Any]
    if kind.provider == "openai":
        headers["Authorization"] = f"Bearer {key}"
        obj = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
        obj["max_tokens"] = 256
        if kind.stream:
            obj["stream"] = True
            if i % 2 == 0:  # the other half: Metergate adds stream_options itself
                obj["stream_options"] = {"include_usage": True}
        return f"{root}/openai/v1/chat/completions", headers, json.dumps(obj).encode()
    headers["x-api-key"] = key
    headers["anthropic-version"] = "2023-06-01"
    obj = {"model": "claude-haiku-4-5-20251001", "max_tokens": 256}
    obj["messages"] = [{"role": "user", "content": text}]
    if kind.stream:
        obj["stream"] = True
    return f"{root}/anthropic/v1/messages", headers, json.dumps(obj).encode()


@dataclass
class Stats:
    """Outcomes per kind over the whole run, and per sample interval."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    lateness: list[float] = field(default_factory=list)
    interval_done: int = 0
    interval_unexpected: int = 0
    interval_chat_ms: list[float] = field(default_factory=list)
    #: with --trace: (start, kind, latency s, outcome) of every request, start in
    #: time.time() seconds, to line up with other logs (py-spy, the proxy's own log)
    trace: list[tuple[float, str, float, str]] | None = None


EXPECTED = {
    "chat-cut": {"200 cut"},
    "messages-cut": {"200 cut"},
    "chat-body-cut": {"502"},
    "unknown-key": {"401"},
}
#: requests run.check_target sends before the soak (one plain, one streamed chat)
CHECK_REQUESTS = 2


async def one_request(
    session: aiohttp.ClientSession, kind: Kind, i: int, root: str, st: Stats
) -> None:
    url, headers, body = request_for(kind, i, root)
    t0 = time.monotonic()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            data = await resp.read()
            if resp.status != 200:
                outcome = str(resp.status)
            elif kind.stream:
                whole = b"data: [DONE]" in data or b"message_stop" in data
                outcome = "200 complete" if whole else "200 cut"
            else:
                outcome = "200"
    except aiohttp.ClientPayloadError:
        outcome = "200 cut"
    except (TimeoutError, aiohttp.ClientError) as exc:
        outcome = f"error {type(exc).__name__}"
    st.outcomes[(kind.name, outcome)] += 1
    st.interval_done += 1
    if outcome not in EXPECTED.get(kind.name, {"200", "200 complete"}):
        st.interval_unexpected += 1
    latency = time.monotonic() - t0
    if kind.name == "chat" and outcome == "200":
        st.interval_chat_ms.append(latency * 1000)
    if st.trace is not None:
        st.trace.append((time.time() - latency, kind.name, latency, outcome))


async def generate(
    session: aiohttp.ClientSession,
    root: str,
    st: Stats,
    rate: float,
    seconds: float,
    mix: tuple[Kind, ...] = MIX,
) -> None:
    """Open loop: request ``i`` starts at ``i / rate`` whatever the earlier ones do."""
    rnd = random.Random(6)
    kinds = rnd.choices(mix, weights=[k.weight for k in mix], k=int(rate * seconds))
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i, kind in enumerate(kinds):
        due = t0 + i / rate
        wait = due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        st.lateness.append(max(0.0, loop.time() - due))
        if len(tasks) >= 2000:  # the proxy is far behind; do not pile up without end
            st.skipped += 1
            continue
        st.sent[kind.name] += 1
        task = asyncio.create_task(one_request(session, kind, i, root, st))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=60)


def tests_running() -> bool:
    cp = subprocess.run(["pgrep", "-f", TEST_PATTERN], capture_output=True, text=True)
    return any(int(p) != os.getpid() for p in cp.stdout.split())


async def sample(
    b: run.Bench, pid: int, st: Stats, every: float, stop: asyncio.Event
) -> list[dict[str, Any]]:
    """Every ``every`` s: memory and CPU of the proxy and its children, others' CPU."""
    out: list[dict[str, Any]] = []
    t0 = prev_t = time.monotonic()
    prev_cpu, prev_snap = tree_cpu_seconds(pid), b._snap()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=every - (time.monotonic() - t0) % every)
            break  # the traffic is over: a last, partial interval would say nothing
        except TimeoutError:
            pass
        now = time.monotonic()
        b.pids = sorted(set(b.pids) | set(run.descendants(pid)))  # the child is "ours"
        rss, kids_rss, nkids = tree_rss_kib(pid)
        cpu = tree_cpu_seconds(pid)
        foreign = b.foreign_end("metergate", "soak", prev_snap)
        chat = sorted(st.interval_chat_ms)
        out.append(
            {
                "t_s": round(now - t0),
                "rss_mib": rss / MIB,
                "children_rss_mib": kids_rss / MIB,
                "children": nkids,
                "total_mib": (rss + kids_rss) / MIB,
                "hwm_mib": run.proc_status_kib(pid, "VmHWM") / MIB,
                "proxy_cpu_pct": (cpu - prev_cpu) / (now - prev_t) * 100,
                "others_cpu_pct": b.raw["metergate"]["soak_foreign_cpu_pct"][-1],
                "pytest": await asyncio.to_thread(tests_running),
                "done_per_s": st.interval_done / (now - prev_t),
                "unexpected": st.interval_unexpected,
                "chat_p99_ms": pct(chat, 99) if chat else None,
                "note": foreign.strip(),
            }
        )
        s = out[-1]
        print(
            f"  {s['t_s']:4d} s  proxy {s['rss_mib']:6.1f} MiB  children "
            f"{s['children_rss_mib']:6.1f} MiB ({s['children']})  "
            f"CPU {s['proxy_cpu_pct']:3.0f}%  others "
            f"{s['others_cpu_pct']:3.0f}%  {s['done_per_s']:5.0f} req/s",
            flush=True,
        )
        st.interval_done = st.interval_unexpected = 0
        st.interval_chat_ms = []
        prev_t, prev_cpu, prev_snap = now, cpu, b._snap()
    return out


def children_detail(pid: int) -> list[str]:
    """One line per process below the proxy: what it is and its memory."""
    out = []
    for kid in run.descendants(pid):
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            rss, hwm = (run.proc_status_kib(kid, k) / MIB for k in ("VmRSS", "VmHWM"))
        except OSError:
            continue
        out.append(f"  child {kid}: RSS {rss:.1f} MiB, peak {hwm:.1f} MiB: {cmd[:90]}")
    return out


def fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f}%"


def flatness(values: list[float]) -> float | None:
    return (max(values) - min(values)) / min(values) if values and min(values) > 0 else None


def slope_per_min(ts: list[float], ys: list[float]) -> float | None:
    """Least-squares slope, MiB per minute: a slow leak shows here before it shows in the
    max - min spread."""
    if len(ts) < 2:
        return None
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den * 60 if den else None


def verdict(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    late = [s for s in samples if s["t_s"] >= warmup_s]
    out: dict[str, Any] = {"samples_after_warmup": len(late)}
    for key in ("rss_mib", "total_mib"):
        vals = [s[key] for s in late]
        out[key] = {
            "min": min(vals, default=None),
            "max": max(vals, default=None),
            "flatness": flatness(vals),
            "slope_mib_per_min": slope_per_min([s["t_s"] for s in late], vals),
        }
    return out


def render_samples(samples: list[dict[str, Any]]) -> str:
    head = "   t s  proxy MiB  children MiB (n)  total MiB  proxy CPU  others CPU  req/s"
    head += "  unexpected  chat p99 ms  pytest"
    lines = [head, "-" * len(head)]
    for s in samples:
        p99 = "—" if s["chat_p99_ms"] is None else f"{s['chat_p99_ms']:.1f}"
        lines.append(
            f"{s['t_s']:6d}  {s['rss_mib']:9.1f}  {s['children_rss_mib']:12.1f} ({s['children']})"
            f"  {s['total_mib']:9.1f}  {s['proxy_cpu_pct']:8.0f}%  {s['others_cpu_pct']:9.0f}%"
            f"  {s['done_per_s']:5.0f}  {s['unexpected']:10d}  {p99:>11}  "
            f"{'yes' if s['pytest'] else 'no'}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup-minutes", type=float, help="default 2, or 1/5 of a shorter run")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second, open loop")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--wait-tests", type=float, default=900.0, help="wait for pytest, s")
    for name in ("proxy", "fake", "load"):
        p.add_argument(f"--{name}-cpus", help="see bench/run.py")
    p.add_argument("--keep-tmp", action="store_true")
    p.add_argument(
        "--only",
        type=lambda text: set(text.split(",")),
        default=set(),
        help="send only these kinds of the mix (comma-separated names, e.g. chat or "
        "chat,chat-stream), to price each kind's CPU per request",
    )
    p.add_argument("--no-budgets", action="store_true", help="Metergate without the 3 budgets")
    p.add_argument(
        "--metergate-src",
        type=Path,
        help="run `python -m proxy.cli serve` from this source tree instead of the installed "
        "work tree (e.g. a copy with a patch to a file you do not own)",
    )
    p.add_argument(
        "--trace",
        type=Path,
        help="write every request (start as epoch s, kind, latency s, outcome) to this CSV",
    )
    args = p.parse_args(argv)
    unknown = args.only - {k.name for k in MIX}
    if unknown:
        p.error(
            f"--only: no such kind {', '.join(sorted(unknown))}; kinds: "
            f"{', '.join(k.name for k in MIX)}"
        )
    if args.warmup_minutes is None:
        args.warmup_minutes = 2.0 if args.minutes >= 10 else args.minutes / 5
    return args


def start(
    rargs: argparse.Namespace, tmp: Path, pin: run.Pinning, procs: list[run.Proc]
) -> tuple[run.Proc, run.Target]:
    """The fake and one Metergate with budgets on the embedded SQLite store."""
    fake_port = run.free_port()
    argv = ["bench/fake_server.py", "--port", str(fake_port), "--require-key", run.UPSTREAM_KEY]
    fake = run.Proc("fake", [sys.executable, *argv], pin.fake, tmp / "fake.log")
    procs.append(fake)
    fake.start()
    store = f"sqlite:///{tmp / 'ledger.db'}"
    # The installed work tree, or --metergate-src (run.start_targets sets these; this
    # harness starts its one proxy itself).
    rargs.metergate_src, rargs.base_src = getattr(rargs, "metergate_src", None), None
    budgets = "" if getattr(rargs, "soak_no_budgets", False) else run.BUDGETS_YAML
    t = run.start_metergate(rargs, tmp, pin, procs, "metergate", fake_port, store, budgets)
    fake.wait_ready(f"http://127.0.0.1:{fake_port}/_fake/health")
    assert t.proc is not None
    t.proc.wait_ready(t.base.rsplit("/", 1)[0] + "/readyz", timeout=60)
    run.check_target(t)
    return fake, t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    waited = wait_for_tests(args.wait_tests)
    print(waited, flush=True)
    cpu_flags = [
        x
        for n in ("proxy", "fake", "load")
        if getattr(args, f"{n}_cpus")
        for x in (f"--{n}-cpus", getattr(args, f"{n}_cpus"))
    ]
    rargs = run.parse_args(["--targets", "metergate", "--no-wrk", *cpu_flags])
    rargs.metergate_src = args.metergate_src.resolve() if args.metergate_src else None
    rargs.soak_no_budgets = args.no_budgets
    pin = run.choose_pinning(rargs)
    os.sched_setaffinity(0, pin.load)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = datetime.now(UTC)
    tmp = Path(tempfile.mkdtemp(prefix="metergate-soak-"))
    procs: list[run.Proc] = []
    try:
        fake, t = start(rargs, tmp, pin, procs)
        assert t.proc is not None
        pid = t.proc.pid
        pids = [p.pid for p in procs]
        # No load-generator process: this harness is the client (pinned to the load CPUs).
        tmap = {"metergate": t}
        b = run.Bench(rargs, tmp, pin.load, fake, tmap, None, None, pin.proxy, pids)  # type: ignore[arg-type]
        root = t.base.rsplit("/", 1)[0]
        print(
            f"pinning: {pin.describe()}; {args.rate:g} req/s for {args.minutes:g} min, "
            f"sample every {args.sample_s:g} s",
            flush=True,
        )
        st = Stats(trace=[] if args.trace else None)

        async def soak() -> list[dict[str, Any]]:
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample(b, pid, st, args.sample_s, stop))
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                mix = tuple(k for k in MIX if not args.only or k.name in args.only)
                await generate(session, root, st, args.rate, args.minutes * 60, mix)
            stop.set()
            return await sampler

        t0 = time.monotonic()
        samples = event_loop_runner()(soak())
        elapsed = time.monotonic() - t0
        time.sleep(2.0)  # the ledger writer's last batch
        if st.trace is not None:
            rows = (f"{t:.4f},{k},{lat:.4f},{o}" for t, k, lat, o in sorted(st.trace))
            args.trace.write_text("start,kind,latency_s,outcome\n" + "\n".join(rows) + "\n")
        result = report(args, rargs, pin, t, tmp, st, samples, started, elapsed, waited)
        run.RESULTS.mkdir(parents=True, exist_ok=True)
        out = run.RESULTS / f"soak-{started:%Y%m%d-%H%M%S}.json"
        out.write_text(json.dumps(result, indent=2, default=str))
        print(f"\nJSON: {out.relative_to(run.ROOT)}")
        return 0
    finally:
        run.stop_all(procs, tmp, keep_tmp=args.keep_tmp)


def report(
    args: argparse.Namespace,
    rargs: argparse.Namespace,
    pin: run.Pinning,
    t: run.Target,
    tmp: Path,
    st: Stats,
    samples: list[dict[str, Any]],
    started: datetime,
    elapsed: float,
    waited: str,
) -> dict[str, Any]:
    assert t.proc is not None
    pid = t.proc.pid
    sent = sum(st.sent.values())
    done = sum(st.outcomes.values())
    checks = run.metergate_checks({"metergate": t}, tmp, Counter(metergate=done), None)["metergate"]
    v = verdict(samples, args.warmup_minutes * 60)
    hwm = run.proc_status_kib(pid, "VmHWM") / MIB
    kids_hwm = run.children_peak_kib(pid) / MIB
    peak_total = max((s["total_mib"] for s in samples), default=0.0)
    lat = sorted(st.lateness)
    pytest_samples = sum(1 for s in samples if s["pytest"])
    others = max((s["others_cpu_pct"] for s in samples), default=0.0)
    lines = [
        f"Soak {started:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s; {os.cpu_count()} CPUs; Metergate "
        f"{rargs.metergate_version} (store sqlite, access log on, metrics on, 3 budgets)",
        f"pinning: {pin.describe()}; open loop {args.rate:g} req/s for {args.minutes:g} min; "
        f"warm-up {args.warmup_minutes:g} min; {waited}",
        "",
        render_samples(samples),
        "",
        f"peak RSS: proxy VmHWM {hwm:.1f} MiB; children VmHWM sum {kids_hwm:.1f} MiB; "
        f"proxy + children {hwm + kids_hwm:.1f} MiB (HWMs), {peak_total:.1f} MiB (max sample)",
        *children_detail(pid),
    ]
    for key, label in (("rss_mib", "proxy process"), ("total_mib", "proxy + children")):
        f = v[key]
        slope = f["slope_mib_per_min"]
        lines.append(
            f"flatness after warm-up, {label}: {f['min']:.1f}..{f['max']:.1f} MiB, "
            f"(max - min) / min = {fmt_pct(f['flatness'])}, trend "
            f"{'—' if slope is None else f'{slope:+.2f}'} MiB/min "
            f"({v['samples_after_warmup']} samples)"
        )
    by_kind = {
        k.name: {o: n for (kn, o), n in sorted(st.outcomes.items()) if kn == k.name} for k in MIX
    }
    lines.append(
        f"requests sent {sent} (+{CHECK_REQUESTS} start-up checks; skipped: {st.skipped}), "
        f"answered {done}:"
    )
    for name, outs in by_kind.items():
        lines.append(f"  {name:16s} sent {st.sent[name]:6d}  {outs}")
    lines.append(
        f"ledger rows {checks.get('ledger_rows')}; /metrics requests "
        f"{checks.get('metered_requests')} by status {checks.get('metered_by_status')}; "
        f"unknown-key 401s "
        f"{by_kind['unknown-key'].get('401', 0)}; sent minus those "
        f"{sent - by_kind['unknown-key'].get('401', 0)} (+{CHECK_REQUESTS} start-up checks)"
    )
    lines.append(
        f"generator lateness p99 {pct(lat, 99) * 1000:.1f} ms, "
        f"max {lat[-1] * 1000 if lat else 0:.1f} ms; "
        f"other processes up to {others:.0f}% of a CPU; pytest seen in "
        f"{pytest_samples}/{len(samples)} samples"
    )
    late = [x for x in samples if x["t_s"] >= args.warmup_minutes * 60 and x["done_per_s"] > 0]
    if late:
        cpu_us = sum(x["proxy_cpu_pct"] / 100 / x["done_per_s"] for x in late) / len(late) * 1e6
        chat_p99 = max(x["chat_p99_ms"] or 0.0 for x in late)
        lines.append(
            f"after warm-up: proxy CPU (with its children) {cpu_us:.0f} µs per request; "
            f"worst 10-s chat p99 {chat_p99:.1f} ms"
        )
    # Budget reserves the store did not answer within store_timeout_ms: a stalled store
    # (fail_open admits the request unchecked and journals the charge).
    unchecked = 0
    with open(tmp / "metergate.log", errors="replace") as log:
        unchecked = sum(1 for line in log if "admitting" in line and "unchecked" in line)
    lines.append(
        f"budget reserves admitted unchecked (store answered nothing in time): {unchecked}"
    )
    text = "\n".join(lines)
    print("\n" + text)
    return {
        "args": vars(args),
        "samples": samples,
        "verdict": v,
        "peak": {"proxy_hwm_mib": hwm, "children_hwm_mib": kids_hwm, "max_total": peak_total},
        "outcomes": {f"{k}|{o}": n for (k, o), n in st.outcomes.items()},
        "sent": dict(st.sent),
        "checks": checks,
        "admitted_unchecked": unchecked,
        "table": text,
    }


if __name__ == "__main__":
    sys.exit(main())
