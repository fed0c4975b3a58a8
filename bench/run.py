"""Metergate against a bare hop, in one run, side by side.

Starts the fake upstream (tests/fake_upstream.py), the reference pass-through proxy
(bench/bare_proxy.py) and Metergate (``metergate serve``, embedded SQLite store, ledger,
metrics and access log on), each pinned to its CPUs, then measures the targets in
alternation, round after round, and prints one table (JSON in bench/results/):

    direct     the client talks to the fake upstream itself
    bare       client → bare_proxy.py → fake
    metergate  client → metergate serve → fake

and, for the cost of budgets (``--budgets``, issue #3), two more Metergate processes on
a throwaway ``redis-server`` that this harness starts (pinned with the load generator):

    metergate-redis          store on Redis, no budgets (the ledger goes to Redis)
    metergate-redis-budgets  the same plus three budgets every request matches: a hard
                             monthly cap scoped {} and one scoped to the caller's team
                             (huge limits), and a requests_per_minute limit on the team
                             (far above any rate here): each request reserves on 2 spend
                             budgets + 1 rate limit, then settles them

Measurements (see bench/README.md for what each number means):
  1. max throughput of a ~300-byte non-streamed chat request (wrk, or aiohttp without it)
  2. proxy CPU µs per request (/proc/PID/stat utime+stime over the measured run)
  3. latency at a steady open-loop rate: p50/p99 and the added latency vs direct
  4. time to the first event of a streamed chat request
  5. peak RSS (VmHWM) of each proxy process
  6. p99 of small requests while 1 MiB-prompt requests are in flight, vs without
  7. Redis targets: Redis CPU and commands per request (``INFO commandstats`` diffed
     around each measurement); after the rounds, ``MONITOR`` during a short load on
     metergate-redis-budgets attributes its round trips to scripts

Run with the project's venv (it needs aiohttp, and the ``metergate`` script):

    .venv/bin/python bench/run.py            # full run, about 3.5 minutes
    .venv/bin/python bench/run.py --quick    # one short round, under a minute
    .venv/bin/python bench/run.py --budgets  # five targets, throughput + latency, ~4.5 min

Everything it starts it stops, by PID, in ``finally``. Stdlib + aiohttp only; ``wrk``
and ``py-spy`` are used when installed; the Redis targets need ``redis-server``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadgen import BIG_PROMPT_BYTES

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
TARGETS = (
    "direct",
    "bare",
    "nginx",
    "metergate",
    "metergate-base",
    "metergate-redis",
    "metergate-redis-budgets",
)
LABELS = {
    "direct": "direct",
    "bare": "bare hop",
    "nginx": "nginx",
    "metergate": "Metergate",
    "metergate-base": "MG base",
    "metergate-redis": "MG redis",
    "metergate-redis-budgets": "MG budgets",
}
#: The SQLite ledger file of each embedded-store target, in the run's temp dir.
LEDGER_FILES = {"metergate": "ledger.db", "metergate-base": "ledger-base.db"}
#: What a run measures without --targets: the original three, or all five (--budgets).
DEFAULT_TARGETS = ("direct", "bare", "metergate")
REDIS_TARGETS = ("metergate-redis", "metergate-redis-budgets")
#: What --budgets measures without --targets.
BUDGETS_TARGETS = tuple(t for t in TARGETS if t not in ("metergate-base", "nginx"))
#: Each Redis target has its own key namespace (ledger and budget keys) on the one
#: throwaway Redis; MONITOR lines of the budgets target are recognised by it.
REDIS_NAMESPACES = {"metergate-redis": "mgr", "metergate-redis-budgets": "mgb"}
BUDGET_TEAM = "bench"
#: Every request of the bench key matches all three: 2 spend holds and 1 rate limit per
#: reserve and per settle. The limits are far above anything a run reaches (9,000,000
#: USD is near the largest a budget takes; the rate is 100,000 requests per second).
BUDGETS_YAML = f"""budgets:
  - {{name: all-monthly, scope: {{}}, limit_usd: 9000000, period: month, enforce: hard}}
  - {{name: team-monthly, scope: {{team: {BUDGET_TEAM}}}, limit_usd: 9000000, enforce: hard}}
  - {{name: team-rpm, scope: {{team: {BUDGET_TEAM}}}, requests_per_minute: 6000000}}
"""
BUDGET_NAMES = ("all-monthly", "team-monthly")

UPSTREAM_KEY = "sk-bench-upstream-0000000000"
METERGATE_KEY = "mg-bench-app-0000000000"
CHAT_PATH = "v1/chat/completions"

#: A realistic small chat request (≈300 bytes), the same bytes for every target.
CHAT_BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a concise '
    b'assistant for a travel booking site."},{"role":"user","content":"Which documents do '
    b"I need to fly from Paris to Toronto with a French passport, and how early should I "
    b'be at the airport?"}],"max_tokens":256,"temperature":0.3,"user":"user-4821"}'
)
STREAM_BODY = CHAT_BODY[:-1] + b',"stream":true}'


# ----------------------------------------------------------------------------- helpers
def parse_cpus(text: str) -> set[int]:
    """'0', '0,2', '2-3' → a set of CPU numbers."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        elif part:
            out.add(int(part))
    return out


def fmt_cpus(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    rest = data[data.rindex(")") + 2 :].split()  # rest[0] is field 3 (state)
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def core_times(cpus: set[int]) -> tuple[float, float]:
    """(busy, total) jiffies of ``cpus`` from /proc/stat; busy includes irq, softirq
    (loopback TCP runs there) and steal."""
    busy = total = 0.0
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name.startswith("cpu") and name != "cpu" and int(name[3:]) in cpus:
                v = [float(x) for x in vals[:8]]
                total += sum(v)
                busy += sum(v) - v[3] - v[4]  # minus idle, iowait
    return busy, total


def machine_busy() -> float:
    """CPU seconds all CPUs spent in processes (user, nice, system) so far. Interrupt
    time is left out: loopback TCP of our own traffic is accounted there, to no one."""
    with open("/proc/stat") as f:
        vals = [float(x) for x in f.readline().split()[1:4]]
    return sum(vals) / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Metergate's token-counting child, multiprocessing's
    resource tracker), so that memory is not hidden in a child."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def children_peak_kib(pid: int) -> int:
    total = 0
    for child in descendants(pid):
        try:
            total += proc_status_kib(child, "VmHWM")
        except OSError:
            pass
    return total


# ----------------------------------------------------------------------- processes
@dataclass
class Proc:
    """A child process pinned to ``cpus``, stopped by PID."""

    name: str
    argv: list[str]
    cpus: set[int]
    log: Path
    env: dict[str, str] | None = None
    cwd: Path = ROOT
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cpus = self.cpus
        with open(self.log, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                preexec_fn=lambda: os.sched_setaffinity(0, cpus),
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait_ready(self, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited at start-up:\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:g} s:\n{self.tail()}")

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)


class Worker:
    """The load-generator process, driven by JSON lines."""

    def __init__(self, cpus: set[int]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, str(BENCH / "loadgen.py")],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )
        self.pid = self.popen.pid

    def call(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(json.dumps(cmd) + "\n")
        self.popen.stdin.flush()
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"load generator gave no answer within {timeout:g} s")
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError("load generator exited")
        out: dict[str, Any] = json.loads(line)
        if "failed" in out:
            raise RuntimeError(f"load generator: {out['failed']}")
        return out

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        try:
            assert self.popen.stdin is not None
            self.popen.stdin.write('{"op": "quit"}\n')
            self.popen.stdin.flush()
            self.popen.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.popen.kill()
            self.popen.wait(timeout=5)


# --------------------------------------------------------------------------- redis
class Resp:
    """A minimal RESP2 client (stdlib only) for the harness's own Redis calls."""

    def __init__(self, port: int, timeout: float | None = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")

    def send(self, *args: Any) -> None:
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            data = a if isinstance(a, bytes) else str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(parts))

    def call(self, *args: Any) -> Any:
        self.send(*args)
        return self.read()

    def read(self) -> Any:
        line = self.rfile.readline()
        if not line:
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:].rstrip(b"\r\n")
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"Redis: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.rfile.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise RuntimeError(f"unexpected Redis reply {line[:80]!r}")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.rfile.close()
        self.sock.close()


#: Commands the harness itself sends while a measurement runs (not Metergate's).
HARNESS_COMMANDS = frozenset({"info", "ping"})


class RedisServer:
    """The throwaway ``redis-server`` of the Redis targets: a free loopback port, no
    persistence, capped memory, pinned to the load CPUs; stopped by PID like the rest."""

    def __init__(self, binary: str, cpus: set[int], tmp: Path) -> None:
        self.port = free_port()
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(tmp)]
        argv += ["--maxmemory", "2gb", "--maxmemory-policy", "noeviction", "--logfile", ""]
        self.proc = Proc("redis", argv, cpus, tmp / "redis.log")
        self._conn: Resp | None = None

    def start(self) -> None:
        self.proc.start()

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"redis-server exited at start-up:\n{self.proc.tail()}")
            try:
                if self.call("PING") == "PONG":
                    return
            except (OSError, ConnectionError, RuntimeError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server not ready after {timeout:g} s:\n{self.proc.tail()}")

    def call(self, *args: Any) -> Any:
        if self._conn is None:
            self._conn = Resp(self.port)
        try:
            return self._conn.call(*args)
        except (OSError, ConnectionError):
            self._conn.close()
            self._conn = None
            raise

    def info(self, section: str) -> dict[str, str]:
        text = self.call("INFO", section).decode()
        return dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line and line[0] != "#"
        )

    def commandstats(self) -> dict[str, tuple[int, int]]:
        """(calls, µs) per command since start; commands run inside scripts are counted
        as well (and a script's µs include theirs)."""
        out: dict[str, tuple[int, int]] = {}
        for name, rest in self.info("commandstats").items():
            if name.startswith("cmdstat_"):
                fields = dict(kv.split("=", 1) for kv in rest.split(","))
                out[name[8:]] = (int(fields["calls"]), int(fields["usec"]))
        return out

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def metered_requests(t: Target) -> int:
    """Requests a Metergate process has finished, from its /metrics."""
    url = t.base.rsplit("/", 1)[0] + "/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("metergate_requests_total{")
        )
    )


def script_names(src: Path) -> dict[str, str]:
    """SHA1 -> name of the store's Lua scripts, as EVALSHA names them: the raw file's,
    and, for the work tree's scripts, the one the store loads (with its prelude)."""
    from proxy.store.redis_scripts import LuaScript

    out = {}
    for f in sorted((src / "proxy" / "store" / "lua").glob("*.lua")):
        out[hashlib.sha1(f.read_text("utf-8").encode()).hexdigest()] = f.stem
        with contextlib.suppress(OSError, ValueError):
            out[LuaScript.load(f.name).sha] = f.stem
    return out


# ------------------------------------------------------------------------- targets
@dataclass
class Target:
    name: str
    base: str  # URL prefix before "v1/…"
    auth: str
    proc: Proc | None  # the proxy process under test (None for direct)

    def url(self, path: str = CHAT_PATH) -> str:
        return f"{self.base}/{path}"

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Authorization": f"Bearer {self.auth}"}
        h.update(extra or {})
        return h


def metergate_config(
    path: Path, port: int, fake_port: int, store: str, access_log: bool, extra: str = ""
) -> None:
    """The config Metergate runs with: metering, ledger, metrics (always on) and the
    access log as in the example config; both upstreams point at the fake. ``extra``:
    more top-level YAML (journal_dir, budgets)."""
    up = f"http://127.0.0.1:{fake_port}"
    path.write_text(
        f"""# generated by bench/run.py
server:
  host: 127.0.0.1
  port: {port}
  shutdown_grace_s: 2
  access_log: {"true" if access_log else "false"}
store: {store}
unknown_model: reject
upstreams:
  openai:    {{url: "{up}", format: openai,    api_key: "{UPSTREAM_KEY}"}}
  anthropic: {{url: "{up}", format: anthropic, api_key: "{UPSTREAM_KEY}"}}
keys:
  - {{key: "{METERGATE_KEY}", name: bench-app, team: {BUDGET_TEAM}, user: bench-user}}
{extra}"""
    )


def check_target(t: Target) -> None:
    """One plain and one streamed request must succeed before anything is measured."""
    req = urllib.request.Request(t.url(), data=CHAT_BODY, headers=t.headers(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        body = json.loads(r.read())
        if r.status != 200 or "usage" not in body:
            raise RuntimeError(f"{t.name}: unexpected answer {r.status} {body!r:.200}")
        if t.name.startswith("metergate") and not r.headers.get("X-Metergate-Cost-USD"):
            raise RuntimeError(f"{t.name}: no X-Metergate-Cost-USD header; is it metering?")
    req = urllib.request.Request(
        t.url(), data=STREAM_BODY, headers=t.headers({"X-Fake-Chunks": "3"}), method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
        if "data: [DONE]" not in text:
            raise RuntimeError(f"{t.name}: stream did not end with [DONE]")


# ------------------------------------------------------------------------ measuring
WRK_LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {auth}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"err_connect":%d,"err_read":%d,' ..
    '"err_write":%d,"err_status":%d,"err_timeout":%d,"p50_us":%d,"p99_us":%d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    load_cpus: set[int]
    fake: Proc
    targets: dict[str, Target]
    worker: Worker
    wrk: str | None
    proxy_cpus: set[int]
    pids: list[int]
    raw: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    sent: Counter[str] = field(default_factory=Counter)
    redis: RedisServer | None = None
    #: per measurement of a Redis target: the commandstats difference, per command
    redis_detail: list[dict[str, Any]] = field(default_factory=list)
    #: requests a budgets target admitted unchecked (fail_open), per test
    unchecked: Counter[str] = field(default_factory=Counter)
    _log_pos: dict[str, int] = field(default_factory=dict)

    def ours(self) -> float:
        """CPU seconds used so far by everything this harness runs (itself included;
        wrk counts once it has exited and been waited for)."""
        total = 0.0
        for pid in self.pids:
            try:
                total += cpu_seconds(pid)
            except OSError:
                pass
        me = os.times()
        return total + me.user + me.system + me.children_user + me.children_system

    def foreign_begin(self) -> tuple[float, float, float]:
        if self.args.wait_quiet > 0:
            wait_quiet(self, self.args.wait_quiet)
        return self._snap()

    def _snap(self) -> tuple[float, float, float]:
        return time.monotonic(), machine_busy(), self.ours()

    def foreign_end(self, target: str, test: str, begin: tuple[float, float, float]) -> str:
        """Record how much CPU *other* processes used during a measurement (% of one
        CPU); a busy neighbour on a shared machine skews everything."""
        t0, m0, o0 = begin
        wall = time.monotonic() - t0
        other = ((machine_busy() - m0) - (self.ours() - o0)) / wall * 100
        self.note(target, f"{test}_foreign_cpu_pct", max(0.0, other))
        if other > self.args.foreign_warn:
            return f"  [others used {other:.0f}% of a CPU]"
        return ""

    def note(self, target: str, metric: str, value: Any) -> None:
        self.raw.setdefault(target, {}).setdefault(metric, []).append(value)

    def wrk_run(self, t: Target, seconds: float) -> dict[str, Any]:
        assert self.wrk is not None
        script = self.tmp / f"wrk-{t.name}.lua"
        if not script.exists():
            script.write_text(WRK_LUA.format(body=json.dumps(CHAT_BODY.decode()), auth=t.auth))
        cpus = self.load_cpus
        cp = subprocess.run(
            [
                self.wrk,
                "-t1",
                f"-c{self.args.connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                str(script),
                t.url(),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )
        for line in cp.stdout.splitlines():
            if line.startswith("WRKJSON "):
                out: dict[str, Any] = json.loads(line[8:])
                errs = sum(v for k, v in out.items() if k.startswith("err_"))
                out["errors"] = errs
                out["rps"] = out["requests"] / (out["duration_us"] / 1e6)
                self.sent[t.name] += out["requests"]
                return out
        raise RuntimeError(f"wrk gave no summary:\n{cp.stdout}\n{cp.stderr}")

    def throughput(self, t: Target) -> None:
        a = self.args
        if self.wrk:
            self.wrk_run(t, a.warmup)
        else:
            warm = self.worker.call(self._closed_cmd(t, a.warmup), a.warmup + 60)
            self.sent[t.name] += warm["requests"]
        f0 = self.foreign_begin()
        r0 = self.redis_begin(t)
        c0 = self._cpu(t)
        k0 = core_times(self.proxy_cpus)
        l0 = core_times(self.load_cpus)
        if self.wrk:
            out = self.wrk_run(t, a.throughput_seconds)
            rps, n, secs = out["rps"], out["requests"], out["duration_us"] / 1e6
        else:
            out = self.worker.call(self._closed_cmd(t, a.throughput_seconds), 120)
            rps, n, secs = out["rps"], out["requests"], out["seconds"]
            self.sent[t.name] += n
        c1 = self._cpu(t)
        k1 = core_times(self.proxy_cpus)
        l1 = core_times(self.load_cpus)
        busy = self.foreign_end(t.name, "throughput", f0)
        rtrips = self.redis_end(t, r0, "", "throughput")
        rtrips += self.new_unchecked(t, "throughput")
        self.note(t.name, "rps", rps)
        if l1[1] > l0[1]:
            self.note(t.name, "load_core_busy_pct", (l1[0] - l0[0]) / (l1[1] - l0[1]) * 100)
        if self.redis is not None and t.name in REDIS_TARGETS:
            self.note(t.name, "redis_cpu_us_per_req", (c1[2] - c0[2]) / n * 1e6)
        self.note(t.name, "throughput_errors", out["errors"])
        self.note(t.name, "fake_cpu_us_per_req", (c1[1] - c0[1]) / n * 1e6)
        if t.proc is not None:
            self.note(t.name, "cpu_us_per_req", (c1[0] - c0[0]) / n * 1e6)
            self.note(t.name, "cpu_busy_pct", (c1[0] - c0[0]) / secs * 100)
            if k1[1] > k0[1]:
                self.note(t.name, "core_busy_pct", (k1[0] - k0[0]) / (k1[1] - k0[1]) * 100)
        self._say(
            f"  {t.name:<23} throughput {rps:8.0f} req/s  errors {out['errors']}{rtrips}{busy}"
        )

    def _closed_cmd(self, t: Target, seconds: float) -> dict[str, Any]:
        return {
            "op": "closed",
            "url": t.url(),
            "headers": t.headers(),
            "body": CHAT_BODY.decode(),
            "connections": self.args.connections,
            "duration": seconds,
        }

    def _cpu(self, t: Target) -> tuple[float, float, float]:
        """CPU seconds so far of the proxy, the fake, and Redis (for Redis targets)."""
        proxy = cpu_seconds(t.proc.pid) if t.proc is not None else 0.0
        redis = 0.0
        if self.redis is not None and t.name in REDIS_TARGETS:
            redis = cpu_seconds(self.redis.proc.pid)
        return proxy, cpu_seconds(self.fake.pid), redis

    def new_unchecked(self, t: Target, test: str) -> str:
        """Requests the budgets target admitted unchecked since the last call (its
        "budget store unavailable, admitting ... unchecked" warnings), counted for
        ``test``. Reads only the new part of its log."""
        if t.name != "metergate-redis-budgets" or t.proc is None:
            return ""
        with open(t.proc.log, "rb") as f:
            f.seek(self._log_pos.get(t.name, 0))
            data = f.read()
        cut = data.rfind(b"\n") + 1  # a line being written is read next time
        self._log_pos[t.name] = self._log_pos.get(t.name, 0) + cut
        n = data[:cut].count(b"budget store unavailable, admitting")
        self.unchecked[test] += n
        return f"  [{n} admitted UNCHECKED: store slower than store_timeout_ms]" if n else ""

    def redis_begin(self, t: Target) -> tuple[dict[str, tuple[int, int]], int] | None:
        """Before a measurement of a Redis target: Redis's command counters and the
        target's finished requests (outside the proxy CPU window: /metrics costs CPU)."""
        if self.redis is None or t.name not in REDIS_TARGETS:
            return None
        return self.redis.commandstats(), metered_requests(t)

    def redis_end(
        self,
        t: Target,
        begin: tuple[dict[str, tuple[int, int]], int] | None,
        prefix: str,
        test: str,
    ) -> str:
        """Commands Redis ran per request the target finished during the measurement:
        EVALSHA/EVAL (one round trip each) and all commands, those run inside the
        scripts included (INFO commandstats counts both)."""
        if begin is None or self.redis is None:
            return ""
        s0, n0 = begin
        time.sleep(0.3)  # the requests cut at the end of the load finish, and settle
        s1, n1 = self.redis.commandstats(), metered_requests(t)
        n = n1 - n0
        if n <= 0:
            return ""
        diff, usec = {}, {}
        for k, (calls, us) in sorted(s1.items()):
            c0, u0 = s0.get(k, (0, 0))
            if k not in HARNESS_COMMANDS and calls > c0:
                diff[k], usec[k] = calls - c0, us - u0
        evals = diff.get("evalsha", 0) + diff.get("eval", 0)
        self.note(t.name, f"{prefix}redis_evals_per_req", evals / n)
        self.note(t.name, f"{prefix}redis_cmds_per_req", sum(diff.values()) / n)
        if evals:
            script_us = usec.get("evalsha", 0) + usec.get("eval", 0)
            self.note(t.name, f"{prefix}redis_script_us", script_us / evals)
        self.redis_detail.append(
            {"target": t.name, "test": test, "requests": n, "calls": diff, "usec": usec}
        )
        return f"  [Redis: {evals / n:.2f} scripts, {sum(diff.values()) / n:.1f} commands per req]"

    def paced(self, t: Target, heavy: bool) -> None:
        a = self.args
        cmd: dict[str, Any] = {
            "op": "paced",
            "url": t.url(),
            "headers": t.headers(),
            "body": CHAT_BODY.decode(),
            "rate": a.rate,
            "duration": a.latency_seconds,
            "warmup": 0.5,
        }
        if heavy:
            cmd["heavy"] = {"url": t.url(), "size": BIG_PROMPT_BYTES, "rate": a.big_rate}
        f0 = self.foreign_begin()
        r0 = None if heavy else self.redis_begin(t)
        c0 = self._cpu(t)
        out = self.worker.call(cmd, a.latency_seconds + 60)
        c1 = self._cpu(t)
        busy = self.foreign_end(t.name, "big" if heavy else "lat", f0)
        rtrips = self.redis_end(t, r0, "lat_", "latency")
        rtrips += self.new_unchecked(t, "big" if heavy else "latency")
        if r0 is not None:
            self.note(t.name, "lat_redis_cpu_us_per_req", (c1[2] - c0[2]) / out["sent_total"] * 1e6)
        self.sent[t.name] += out["sent_total"] + out.get("heavy_n", 0)
        key = "big" if heavy else "lat"
        for k in ("p50_ms", "p99_ms", "max_ms", "errors", "gen_lateness_p99_ms"):
            self.note(t.name, f"{key}_{k}", out[k])
        if heavy:
            self.note(t.name, "big_heavy_n", out["heavy_n"])
            self.note(t.name, "big_heavy_errors", out["heavy_errors"])
            self.note(t.name, "big_heavy_p50_ms", out["heavy_p50_ms"])
        elif t.proc is not None:
            self.note(t.name, "lat_cpu_us_per_req", (c1[0] - c0[0]) / out["sent_total"] * 1e6)
        what = "with 1 MiB prompts" if heavy else f"at {a.rate:g} req/s"
        self._say(
            f"  {t.name:<23} latency {what}: p50 {out['p50_ms']:.2f} ms, "
            f"p99 {out['p99_ms']:.2f} ms, errors {out['errors']}"
            + (f", big {out['heavy_n']} (errors {out['heavy_errors']})" if heavy else "")
            + rtrips
            + busy
        )

    def ttfb(self, t: Target) -> None:
        a = self.args
        headers = t.headers(
            {"X-Fake-Chunks": str(a.stream_chunks), "X-Fake-Chunk-Delay-Ms": str(a.chunk_delay_ms)}
        )
        f0 = self.foreign_begin()
        out = self.worker.call(
            {
                "op": "ttfb",
                "url": t.url(),
                "headers": headers,
                "body": STREAM_BODY.decode(),
                "n": a.ttfb_n,
            },
            a.ttfb_n * 5 + 30,
        )
        busy = self.foreign_end(t.name, "ttfb", f0)
        self.sent[t.name] += a.ttfb_n
        self.note(t.name, "ttfb_ms", out["ttfb_median_ms"])
        self.note(t.name, "stream_total_ms", out["total_median_ms"])
        self.note(t.name, "ttfb_errors", out["errors"])
        self._say(
            f"  {t.name:<23} stream first event {out['ttfb_median_ms']:.2f} ms "
            f"(whole stream {out['total_median_ms']:.1f} ms), errors {out['errors']}{busy}"
        )

    def _say(self, msg: str) -> None:
        print(msg, flush=True)


# -------------------------------------------------------------------------- report
def med(values: list[Any] | None) -> float | None:
    vals = [v for v in (values or []) if v == v]  # drop NaN
    return statistics.median(vals) if vals else None


def summarise(raw: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for target, metrics in raw.items():
        out[target] = {k: med(v) for k, v in metrics.items()}
    d = out.get("direct", {})
    for m in out.values():
        for key in ("lat_p50_ms", "lat_p99_ms", "ttfb_ms", "big_p99_ms"):
            if m.get(key) is not None and d.get(key) is not None:
                m["added_" + key] = m[key] - d[key]  # type: ignore[operator]
        if m.get("big_p99_ms") is not None and m.get("lat_p99_ms") is not None:
            m["big_p99_increase_ms"] = m["big_p99_ms"] - m["lat_p99_ms"]  # type: ignore[operator]
    return out


def render_table(s: dict[str, dict[str, float | None]], targets: list[str], rate: float) -> str:
    def cell(target: str, key: str, fmt: str, sign: bool = False) -> str:
        v = s.get(target, {}).get(key)
        if v is None:
            return "—"
        return (("+" if v >= 0 else "") if sign else "") + format(v, fmt)

    def compare(a: str, b_: str, key: str, kind: str, fmt: str) -> str:
        m = s.get(a, {}).get(key)
        b = s.get(b_, {}).get(key)
        if m is None or b is None:
            return ""
        if kind == "ratio":
            return f"{m / b:.2f}x" if b else ""
        if kind == "ratio+diff":
            return f"{m / b:.2f}x ({m - b:+{fmt}})" if b else ""
        return format(m - b, "+" + fmt)

    rows: list[tuple[str, str, str, bool, str]] = [
        # label, key, format, signed, last-column kind
        ("throughput, req/s (max, closed loop)", "rps", ".0f", False, "ratio"),
        ("  proxy CPU per request, µs", "cpu_us_per_req", ".0f", False, "ratio+diff"),
        ("  proxy process CPU busy during it, %", "cpu_busy_pct", ".0f", False, ""),
        ("  proxy's core busy (incl. softirq), %", "core_busy_pct", ".0f", False, ""),
        ("  fake upstream CPU per request, µs", "fake_cpu_us_per_req", ".0f", False, ""),
        ("  load generator's CPU busy, %", "load_core_busy_pct", ".0f", False, ""),
        ("  Redis CPU per request, µs", "redis_cpu_us_per_req", ".0f", False, "ratio+diff"),
        ("  Redis EVALSHA/EVAL per request", "redis_evals_per_req", ".2f", False, "diff"),
        ("  Redis commands/request (incl. in scripts)", "redis_cmds_per_req", ".1f", False, "diff"),
        (f"latency @{rate:g} req/s p50, ms", "lat_p50_ms", ".2f", False, "ratio+diff"),
        ("  added vs direct p50, ms", "added_lat_p50_ms", ".2f", True, "diff"),
        (f"latency @{rate:g} req/s p99, ms", "lat_p99_ms", ".2f", False, "ratio+diff"),
        ("  added vs direct p99, ms", "added_lat_p99_ms", ".2f", True, "diff"),
        (
            f"  proxy CPU per request @{rate:g} req/s, µs",
            "lat_cpu_us_per_req",
            ".0f",
            False,
            "ratio+diff",
        ),
        (
            f"  Redis CPU per request @{rate:g} req/s, µs",
            "lat_redis_cpu_us_per_req",
            ".0f",
            False,
            "ratio+diff",
        ),
        (
            f"  Redis EVALSHA/EVAL per request @{rate:g}",
            "lat_redis_evals_per_req",
            ".2f",
            False,
            "diff",
        ),
        ("stream first event, ms (median)", "ttfb_ms", ".2f", False, "diff"),
        ("  added vs direct, ms", "added_ttfb_ms", ".2f", True, "diff"),
        ("p99 with 1 MiB prompts in flight, ms", "big_p99_ms", ".2f", False, "diff"),
        ("  increase vs without them, ms", "big_p99_increase_ms", ".2f", True, "diff"),
        (
            "  the 1 MiB-prompt requests themselves p50, ms",
            "big_heavy_p50_ms",
            ".1f",
            False,
            "diff",
        ),
        ("peak RSS (VmHWM), MiB", "rss_peak_mib", ".1f", False, "ratio+diff"),
        ("  RSS when started, MiB", "rss_start_mib", ".1f", False, "diff"),
        ("  peak RSS of its child processes, MiB", "rss_children_mib", ".1f", False, "diff"),
    ]
    cols = [LABELS[t] for t in targets]
    pairs = comparisons(targets)
    header = ["metric (median of rounds)", *cols] + [title for _, _, title in pairs]
    lines = []
    body: list[list[str]] = []
    for label, key, fmt, signed, kind in rows:
        if all(s.get(t, {}).get(key) is None for t in targets):
            continue
        row = [label] + [cell(t, key, fmt, signed) for t in targets]
        row += [compare(a, b, key, kind, fmt) if kind else "" for a, b, _ in pairs]
        body.append(row)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(
            r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(r))
        ).rstrip()

    lines.append(line(header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(line(r) for r in body)
    return "\n".join(lines)


def comparisons(targets: list[str]) -> list[tuple[str, str, str]]:
    """The table's last columns: (target, reference, title)."""
    out = []
    if "metergate-redis-budgets" in targets and "metergate-redis" in targets:
        out.append(("metergate-redis-budgets", "metergate-redis", "budgets on vs off"))
    if "metergate-redis-budgets" in targets and "bare" in targets:
        out.append(("metergate-redis-budgets", "bare", "budgets vs bare"))
    if not out and "metergate" in targets and "bare" in targets:
        out.append(("metergate", "bare", "Metergate vs bare"))
        if "metergate-base" in targets:
            out.append(("metergate-base", "bare", "base vs bare"))
            out.append(("metergate", "metergate-base", "Metergate vs base"))
    return out


def render_round_trips(s: dict[str, dict[str, float | None]], monitor: dict[str, Any]) -> list[str]:
    """Redis round trips per request of the budgets target, with and without budgets."""
    on, off = s.get("metergate-redis-budgets", {}), s.get("metergate-redis", {})
    out = []
    for prefix, what in (("", "throughput runs"), ("lat_", "paced runs")):
        evals, cmds = on.get(prefix + "redis_evals_per_req"), on.get(prefix + "redis_cmds_per_req")
        if evals is None or cmds is None:
            continue
        us = on.get(prefix + "redis_script_us")
        line = (
            f"Redis per request, INFO commandstats over the {what} (median of rounds): "
            f"MG budgets {evals:.3f} EVALSHA/EVAL, {cmds:.1f} commands incl. inside scripts"
            + (f", {us:.0f} µs in Redis per script call" if us is not None else "")
        )
        e0, c0 = off.get(prefix + "redis_evals_per_req"), off.get(prefix + "redis_cmds_per_req")
        if e0 is not None and c0 is not None:
            us0 = off.get(prefix + "redis_script_us")
            line += (
                f"; MG redis {e0:.3f} and {c0:.1f}"
                + (f" ({us0:.0f} µs per ledger script call)" if us0 is not None else "")
                + f"\n  => budgets add {evals - e0:.3f} round trips (script calls) per request"
            )
        out.append(line)
    if monitor:
        out.append(f"MONITOR, MG budgets: {render_monitor(monitor)}")
    return out


# --------------------------------------------------------------------------- profile
def profile_target(
    b: Bench, name: str, seconds: float, out_dir: Path, stamp: str
) -> dict[str, Any]:
    """py-spy on a proxy under the wrk throughput load; a top-15 by own and total."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    t = b.targets[name]
    if not Path(pyspy).exists() or not b.wrk or t.proc is None:
        print("profile skipped: needs py-spy and wrk", flush=True)
        return {}
    raw_path = out_dir / f"profile-{stamp}-{name}.txt"
    cpus = b.load_cpus
    spy = subprocess.Popen(
        [
            pyspy,
            "record",
            "--pid",
            str(t.proc.pid),
            "--format",
            "raw",
            "--nolineno",
            "--rate",
            "200",
            "--duration",
            f"{seconds:g}",
            "-o",
            str(raw_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    try:
        time.sleep(0.5)
        c0 = cpu_seconds(t.proc.pid)
        out = b.wrk_run(t, seconds)
        c1 = cpu_seconds(t.proc.pid)
        spy.wait(timeout=seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not raw_path.exists():
        print("profile failed: py-spy wrote nothing (ptrace not allowed?)", flush=True)
        return {}
    summary = summarise_collapsed(raw_path.read_text())
    summary["file"] = str(raw_path.relative_to(ROOT))
    summary["target"] = name
    summary["rps"] = out["rps"]
    summary["cpu_us_per_req"] = (c1 - c0) / max(1, out["requests"]) * 1e6
    return summary


#: Leaf frames that mean "waiting", not "working".
IDLE_LEAVES = (
    "_worker (concurrent/futures/thread.py)",
    "Thread.run (threading.py)",
    # the access log's writer thread asleep between batches (time.sleep has no frame)
    "BatchingStreamHandler._run (proxy/access_log.py)",
    "Condition.wait (threading.py)",
)


def summarise_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    samples = idle = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        # the first frame may be "process ..." / "thread ..." with --threads; skip those
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames or frames[-1].startswith(IDLE_LEAVES):
            # An executor thread waiting for work: py-spy does not always see it as idle.
            samples -= n
            idle += n
            continue
        own[frames[-1]] += n
        leaf = frames[-1]
        by_file[leaf[leaf.rfind("(") + 1 : -1] if leaf.endswith(")") else leaf] += n
        for f in set(frames):
            total[f] += n

    def rows(c: Counter[str], below: float = 101.0) -> list[dict[str, Any]]:
        kept = [(k, v) for k, v in c.most_common() if 100 * v / max(1, samples) < below]
        return [
            {"pct": round(100 * v / samples, 1), "samples": v, "frame": k} for k, v in kept[:top]
        ]

    return {
        "samples": samples,
        "idle_samples_dropped": idle,
        "own": rows(own),
        # Frames in (nearly) every sample are the event loop's callers: not informative.
        "total": rows(total, below=90.0),
        "own_by_file": rows(by_file),
    }


def render_profile(p: dict[str, Any]) -> str:
    per_req = p.get("cpu_us_per_req", 0.0)
    out = [
        f"py-spy, {p['samples']} busy samples of {LABELS[p['target']]} under the throughput "
        f"load ({p['file']}); {p.get('rps', 0):.0f} req/s while sampled, "
        f"{per_req:.0f} µs CPU per request; µs/req = share x that"
    ]
    titles = {
        "own": "top by own time",
        "total": "top by total time (below the event loop)",
        "own_by_file": "own time by file",
    }
    for kind, title in titles.items():
        out.append(f"{title}:")
        out.extend(
            f"  {r['pct']:5.1f}%  {r['pct'] * per_req / 100:5.0f} µs  {r['frame']}" for r in p[kind]
        )
    return "\n".join(out)


# ------------------------------------------------------------------------------ main
def default_cpus() -> tuple[set[int], set[int], set[int], str]:
    """(proxy, fake, load) CPUs, and why."""
    avail = sorted(os.sched_getaffinity(0))
    if len(avail) >= 3:
        return {avail[0]}, {avail[1]}, {avail[2]}, "one CPU each for proxy, fake and load"
    if len(avail) == 2:
        return (
            {avail[0]},
            {avail[1]},
            {avail[1]},
            "proxy under test alone on one CPU; fake upstream and load generator share the other",
        )
    return set(avail), set(avail), set(avail), "ONE CPU: everything shares it; numbers are rough"


def siblings(cpu: int) -> set[int]:
    try:
        text = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text()
        return parse_cpus(text.strip())
    except OSError:
        return {cpu}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Metergate vs a bare aiohttp hop vs direct.")
    p.add_argument("--quick", action="store_true", help="one short round (under a minute)")
    p.add_argument(
        "--budgets",
        action="store_true",
        help="the cost of budgets on Redis (issue #3): all five targets, and only the "
        "throughput and latency tests unless --skip says otherwise (~4.5 min; quick ~1 min)",
    )
    p.add_argument(
        "--targets",
        help=f"subset of {','.join(TARGETS)}, or all (default: "
        f"{','.join(DEFAULT_TARGETS)}; with --budgets: all)",
    )
    p.add_argument("--rounds", type=int, help="rounds, median taken (default 3; quick 1)")
    p.add_argument("--throughput-seconds", type=float, help="per target per round (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="throughput warm-up seconds")
    p.add_argument("--connections", type=int, default=50, help="throughput concurrency")
    p.add_argument("--rate", type=float, default=300.0, help="steady rate for latency, req/s")
    p.add_argument("--latency-seconds", type=float, help="per target per round (default 6)")
    p.add_argument("--ttfb-n", type=int, help="streamed requests per target per round (20)")
    p.add_argument("--stream-chunks", type=int, default=5)
    p.add_argument("--chunk-delay-ms", type=int, default=20)
    p.add_argument("--big-rate", type=float, default=4.0, help="1 MiB-prompt requests per s")
    p.add_argument(
        "--skip",
        help="tests to skip: throughput,latency,ttfb,big (default none; with --budgets: "
        "ttfb,big; --skip '' runs all)",
    )
    p.add_argument("--no-wrk", action="store_true", help="use the aiohttp load generator")
    p.add_argument("--no-access-log", action="store_true", help="Metergate access_log: false")
    p.add_argument(
        "--store",
        default="sqlite",
        help="Metergate's store: sqlite (a fresh file in the temp dir, the default) or a "
        "store URL such as memory:// (to measure what the durable ledger costs)",
    )
    p.add_argument("--proxy-cpus", help="CPUs of the proxy under test (default: first CPU)")
    p.add_argument("--fake-cpus", help="CPUs of the fake upstream")
    p.add_argument("--load-cpus", help="CPUs of the load generator (and of this harness)")
    p.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after the rounds, py-spy Metergate under wrk load for SECONDS",
    )
    p.add_argument(
        "--profile-targets",
        default="metergate",
        help="which proxies --profile samples (default metergate; e.g. bare,metergate)",
    )
    p.add_argument(
        "--metergate-rev",
        metavar="REV",
        help="bench the committed tree at git REV (e.g. HEAD) instead of the "
        "installed work tree; runs `python -m proxy.cli serve` from a git archive",
    )
    p.add_argument(
        "--base-rev",
        metavar="REV",
        default="HEAD",
        help="the commit the metergate-base target runs (default HEAD): with "
        "--targets bare,metergate,metergate-base the table compares the work tree with "
        "it side by side, in one run",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement, wait up to SECONDS for other processes to use "
        "under --foreign-warn %% of a CPU (shared machines)",
    )
    p.add_argument(
        "--foreign-warn",
        type=float,
        default=10.0,
        metavar="PCT",
        help="warn when other processes use more than PCT%% of a CPU (default 10)",
    )
    p.add_argument(
        "--redis-server",
        default=shutil.which("redis-server"),
        help="the redis-server binary for the Redis targets (default: from PATH); the "
        "harness starts its own on a free loopback port, no persistence",
    )
    p.add_argument(
        "--monitor-seconds",
        type=float,
        default=2.0,
        help="after the rounds, MONITOR Redis while wrk drives metergate-redis-budgets this "
        "long, to attribute its round trips to scripts (0: off; default 2)",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, ledger)")
    args = p.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.throughput_seconds = args.throughput_seconds or (3.0 if q else 5.0)
    args.latency_seconds = args.latency_seconds or (3.0 if q else 6.0)
    args.ttfb_n = args.ttfb_n or (10 if q else 20)
    if args.targets is None:
        args.targets = ",".join(BUDGETS_TARGETS if args.budgets else DEFAULT_TARGETS)
    elif args.targets.strip() == "all":
        args.targets = ",".join(TARGETS)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or any(t not in TARGETS for t in targets):
        p.error(f"--targets takes all, or a comma-separated subset of {', '.join(TARGETS)}")
    args.targets = [t for t in TARGETS if t in targets]  # fixed column order
    if args.skip is None:
        args.skip = "ttfb,big" if args.budgets else ""
    args.skip = sorted({s.strip() for s in args.skip.split(",") if s.strip()})
    args.redis_version = None
    if any(t in REDIS_TARGETS for t in args.targets) and not args.redis_server:
        p.error("the Redis targets need redis-server (on PATH, or --redis-server PATH)")
    args.wrk = None if args.no_wrk else shutil.which("wrk")
    args.metergate_bin = None
    # Commits are pinned now: the branch may move while the run goes on.
    args.metergate_commit = None
    if args.metergate_rev:
        args.metergate_commit = resolve_commit(p, "--metergate-rev", args.metergate_rev)
    args.metergate_version = metergate_version(args.metergate_commit)
    args.base_commit = None
    if "metergate-base" in args.targets:
        args.base_commit = resolve_commit(p, "--base-rev", args.base_rev)
    if any(t.startswith("metergate") for t in args.targets) and not args.metergate_rev:
        found = Path(sys.executable).parent / "metergate"
        if not found.exists():
            found = Path(shutil.which("metergate") or "")
        if not found.name:
            p.error("no `metergate` script; run `.venv/bin/pip install -e .` first")
        args.metergate_bin = str(found)
    return args


@dataclass
class Pinning:
    proxy: set[int]
    fake: set[int]
    load: set[int]
    why: str

    def describe(self) -> str:
        return (
            f"proxy {fmt_cpus(self.proxy)} | fake {fmt_cpus(self.fake)} | "
            f"load {fmt_cpus(self.load)}"
        )


def choose_pinning(args: argparse.Namespace) -> Pinning:
    proxy, fake, load, why = default_cpus()
    if args.proxy_cpus or args.fake_cpus or args.load_cpus:
        why = "set by flags"
    pin = Pinning(
        parse_cpus(args.proxy_cpus) if args.proxy_cpus else proxy,
        parse_cpus(args.fake_cpus) if args.fake_cpus else fake,
        parse_cpus(args.load_cpus) if args.load_cpus else load,
        why,
    )
    shared = {c for cpu in pin.proxy for c in siblings(cpu)} & (pin.fake | pin.load)
    if shared:
        print(f"warning: proxy CPUs share cores (SMT) with CPUs {fmt_cpus(shared)}", flush=True)
    return pin


def start_metergate(
    args: argparse.Namespace,
    tmp: Path,
    pin: Pinning,
    procs: list[Proc],
    name: str,
    fake_port: int,
    store: str,
    extra: str,
) -> Target:
    """Start one Metergate process (not waiting for it) on the proxy CPUs."""
    port = free_port()
    cfg = tmp / f"{name}.yaml"
    metergate_config(cfg, port, fake_port, store, not args.no_access_log, extra)
    serve = ["serve", "--config", str(cfg), "--log-level", "INFO"]
    src = args.base_src if name == "metergate-base" else args.metergate_src
    if src is not None:
        mg = Proc(
            name,
            [sys.executable, "-m", "proxy.cli", *serve],
            pin.proxy,
            tmp / f"{name}.log",
            env={**os.environ, "PYTHONPATH": str(src)},
            cwd=src,  # `python -m` puts the cwd first on sys.path
        )
    else:
        mg = Proc(name, [args.metergate_bin, *serve], pin.proxy, tmp / f"{name}.log")
    procs.append(mg)
    mg.start()
    return Target(name, f"http://127.0.0.1:{port}/openai", METERGATE_KEY, mg)


def nginx_preamble(tmp: Path, connections: int) -> str:
    """The start of an nginx config for the bench: foreground, one process, every file
    in ``tmp``, no access log; the ``http`` block is left open for the caller's
    servers."""
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections {connections}; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  keepalive_requests 1000000;"""


def start_nginx(tmp: Path, pin: Pinning, procs: list[Proc], fake_port: int) -> Target:
    """nginx as the hop (Debian's ``nginx-light``): one worker process on the proxy CPUs,
    kept-alive upstream connections, no buffering, so streams go through as they come.
    A reference for what a hop costs in C."""
    if shutil.which("nginx") is None:
        raise SystemExit("the nginx target needs nginx (apt-get install -y nginx-light)")
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""{nginx_preamble(tmp, 4096)}
  upstream fake {{ server 127.0.0.1:{fake_port}; keepalive 1024; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /healthz {{ return 200 "ok"; }}
    location /openai/ {{
      proxy_pass http://fake/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      client_max_body_size 0;
    }}
  }}
}}
"""
    )
    proc = Proc("nginx", ["nginx", "-p", str(tmp), "-c", str(conf)], pin.proxy, tmp / "nginx.log")
    procs.append(proc)
    proc.start()
    return Target("nginx", f"http://127.0.0.1:{port}/openai", UPSTREAM_KEY, proc)


def start_targets(
    args: argparse.Namespace,
    tmp: Path,
    pin: Pinning,
    procs: list[Proc],
    fake_argv: list[str] | None = None,
) -> tuple[Proc, dict[str, Target], RedisServer | None]:
    """Start the fake, Redis (for the Redis targets) and the proxies (appending each to
    ``procs`` at once, so the caller's ``finally`` stops it), wait until each is ready,
    and check each target. ``fake_argv``: another fake upstream (bench/streams.py's
    native rig), run with its port appended."""
    args.metergate_src = args.base_src = None
    if args.metergate_rev and any(n.startswith("metergate") for n in args.targets):
        args.metergate_src = export_tree(args.metergate_commit, tmp / "metergate-src")
    if args.base_commit:
        args.base_src = export_tree(args.base_commit, tmp / "metergate-base-src")
    fake_port = free_port()
    up = f"http://127.0.0.1:{fake_port}"
    # --require-key: the fake refuses any other key, so Metergate must swap its key in.
    if fake_argv is None:
        fake_argv = [
            sys.executable,
            "bench/fake_server.py",
            "--require-key",
            UPSTREAM_KEY,
            "--port",
        ]
    fake = Proc(
        "fake",
        [*fake_argv, str(fake_port)],
        pin.fake,
        tmp / "fake.log",
    )
    procs.append(fake)
    fake.start()
    redis: RedisServer | None = None
    if any(n in REDIS_TARGETS for n in args.targets):
        redis = RedisServer(args.redis_server, pin.load, tmp)
        procs.append(redis.proc)
        redis.start()
        redis.wait_ready()
        args.redis_version = redis.info("server").get("redis_version", "?")
    tmap: dict[str, Target] = {}
    if "direct" in args.targets:
        tmap["direct"] = Target("direct", up, UPSTREAM_KEY, None)
    if "bare" in args.targets:
        port = free_port()
        bare_ups = ["--upstream", f"openai={up}", "--upstream", f"anthropic={up}"]
        bare = Proc(
            "bare",
            [sys.executable, "bench/bare_proxy.py", "--port", str(port), *bare_ups],
            pin.proxy,
            tmp / "bare.log",
        )
        procs.append(bare)
        bare.start()
        tmap["bare"] = Target("bare", f"http://127.0.0.1:{port}/openai", UPSTREAM_KEY, bare)
    if "nginx" in args.targets:
        tmap["nginx"] = start_nginx(tmp, pin, procs, fake_port)
    for name in (n for n in args.targets if n.startswith("metergate")):
        extra = ""
        if name in LEDGER_FILES:
            db = tmp / LEDGER_FILES[name]
            store = f"sqlite:///{db}" if args.store == "sqlite" else args.store
        else:
            assert redis is not None
            ns = REDIS_NAMESPACES[name]
            store = f"redis://127.0.0.1:{redis.port}/0?namespace={ns}"
            # Not the default ./metergate-journal, which is relative to the cwd.
            extra = f'journal_dir: "{tmp / ("journal-" + ns)}"\n'
            if name == "metergate-redis-budgets":
                extra += BUDGETS_YAML
        tmap[name] = start_metergate(args, tmp, pin, procs, name, fake_port, store, extra)
    fake.wait_ready(f"{up}/_fake/health")
    for name, t in tmap.items():
        if t.proc is not None:
            path = "/readyz" if name.startswith("metergate") else "/healthz"
            t.proc.wait_ready(t.base.rsplit("/", 1)[0] + path, timeout=60)
    for t in tmap.values():
        check_target(t)
    return fake, tmap, redis


def run_rounds(b: Bench) -> None:
    """Every test, target after target, in rounds; the order of the targets rotates from
    round to round so that drift on a shared machine hits all of them alike."""
    args, targets = b.args, b.args.targets
    for rnd in range(args.rounds):
        order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
        print(f"round {rnd + 1}/{args.rounds} (order {', '.join(order)})", flush=True)
        if "throughput" not in args.skip:
            for name in order:
                b.throughput(b.targets[name])
        if "latency" not in args.skip:
            for name in order:
                b.paced(b.targets[name], heavy=False)
        if "ttfb" not in args.skip:
            for name in order:
                b.ttfb(b.targets[name])
        if "big" not in args.skip:
            for name in order:
                b.paced(b.targets[name], heavy=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pin = choose_pinning(args)
    os.sched_setaffinity(0, pin.load)  # the harness itself stays off the proxy's CPU
    # SIGTERM (e.g. from a CI timeout) must still run the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = datetime.now(UTC)
    t_begin = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="metergate-bench-"))
    procs: list[Proc] = []
    worker: Worker | None = None
    redis: RedisServer | None = None
    try:
        fake, tmap, redis = start_targets(args, tmp, pin, procs)
        rss_start = {
            n: proc_status_kib(t.proc.pid, "VmRSS") / 1024 for n, t in tmap.items() if t.proc
        }
        worker = Worker(pin.load)
        b = Bench(
            args,
            tmp,
            pin.load,
            fake,
            tmap,
            worker,
            args.wrk,
            pin.proxy,
            [pr.pid for pr in procs] + [worker.pid],
            redis=redis,
        )
        for name in tmap:
            b.sent[name] += 2  # check_target
        gen = f"wrk ({args.wrk})" if args.wrk else "aiohttp closed-loop generator (no wrk)"
        print(
            f"pinning: {pin.describe()} ({pin.why})\nthroughput load: {gen}; "
            f"{args.rounds} round(s); targets {', '.join(args.targets)}",
            flush=True,
        )
        run_rounds(b)
        for name, t in tmap.items():
            if t.proc is not None:
                b.note(name, "rss_peak_mib", proc_status_kib(t.proc.pid, "VmHWM") / 1024)
                b.note(name, "rss_start_mib", rss_start[name])
                b.note(name, "rss_children_mib", children_peak_kib(t.proc.pid) / 1024)
        result: dict[str, Any] = {"monitor": {}}
        if redis is not None and "metergate-redis-budgets" in tmap and args.monitor_seconds > 0:
            result["monitor"] = monitor_round_trips(b, args.monitor_seconds)
        elapsed = time.monotonic() - t_begin
        result["checks"] = metergate_checks(tmap, tmp, b.sent, redis)
        if "metergate-redis-budgets" in result["checks"]:
            b.new_unchecked(tmap["metergate-redis-budgets"], "other")
            result["checks"]["metergate-redis-budgets"]["unchecked_by_test"] = dict(b.unchecked)
        result["redis_detail"] = b.redis_detail
        stamp = started.strftime("%Y%m%d-%H%M%S")
        RESULTS.mkdir(parents=True, exist_ok=True)
        result["profiles"] = {}
        if args.profile > 0:
            for name in (n.strip() for n in args.profile_targets.split(",")):
                if name in tmap and tmap[name].proc is not None:
                    prof = profile_target(b, name, args.profile, RESULTS, stamp)
                    if prof:
                        result["profiles"][name] = prof
        report(b, result, pin, started, elapsed, stamp)
        return 0
    finally:
        if redis is not None:
            redis.close()
        if worker is not None:
            worker.stop()
        stop_all(procs, tmp, keep_tmp=args.keep_tmp)


def report(
    b: Bench,
    result: dict[str, Any],
    pin: Pinning,
    started: datetime,
    elapsed: float,
    stamp: str,
) -> None:
    """Print the table (and warnings, and profiles); write the JSON."""
    args = b.args
    summary = summarise(b.raw)
    mg = [t for t in args.targets if t.startswith("metergate")]
    stores, store_lines = "", ""
    if mg == ["metergate"]:
        stores = f"store {args.store}, "
    elif mg:
        store_lines = f"stores: {store_summary(args, pin)}\n"
    header = (
        f"Metergate bench {started:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s; "
        f"{os.cpu_count()} CPUs ({_cpu_model()}), "
        f"Python {platform.python_version()}, aiohttp {_aiohttp_version()}; "
        f"Metergate {args.metergate_version} ({stores}"
        f"access log {'off' if args.no_access_log else 'on'})\n"
        f"{store_lines}"
        f"pinning: {pin.describe()}; throughput: "
        f"{'wrk -t1' if args.wrk else 'aiohttp'} -c{args.connections} "
        f"{args.throughput_seconds:g} s; latency: open loop {args.rate:g} req/s "
        f"{args.latency_seconds:g} s; stream: {args.stream_chunks} chunks "
        f"{args.chunk_delay_ms} ms apart; 1 MiB prompts at {args.big_rate:g}/s; "
        f"{args.rounds} round(s)"
    )
    table = render_table(summary, args.targets, args.rate)
    notes = render_checks(result["checks"])
    notes.extend(render_round_trips(summary, result["monitor"]))

    def worst(suffix: str) -> float:
        return max(
            (max(v) for m in b.raw.values() for k, v in m.items() if k.endswith(suffix)),
            default=0.0,
        )

    foreign = worst("foreign_cpu_pct")
    result["max_foreign_cpu_pct"] = foreign
    notes.append(
        f"other processes on the machine: at most {foreign:.0f}% of a CPU during a measurement"
        + ("  <-- noisy, compare with care" if foreign > args.foreign_warn else "")
    )
    lag = worst("gen_lateness_p99_ms")
    if lag > 5:
        notes.append(
            f"WARNING: the load generator started requests up to {lag:.1f} ms late (p99); "
            "the paced latencies include that"
        )
    errs = {n: sum(sum(v) for k, v in m.items() if k.endswith("errors")) for n, m in b.raw.items()}
    if any(errs.values()):
        notes.append(f"WARNING: failed requests per target: {errs}")
    print()
    print(header)
    print(table)
    print("\n".join(notes))
    for prof in result["profiles"].values():
        print()
        print(render_profile(prof))
    result.update(
        {
            "started_utc": started.isoformat(timespec="seconds"),
            "seconds": round(elapsed, 1),
            "host": {
                "cpus": os.cpu_count(),
                "cpu_model": _cpu_model(),
                "python": platform.python_version(),
                "aiohttp": _aiohttp_version(),
                "kernel": platform.release(),
            },
            "pinning": {
                "proxy": sorted(pin.proxy),
                "fake": sorted(pin.fake),
                "load": sorted(pin.load),
                "why": pin.why,
            },
            "load_generator": "wrk" if args.wrk else "aiohttp",
            "metergate_version": args.metergate_version,
            "args": vars(args),
            "summary": summary,
            "rounds": b.raw,
            "table": "\n".join([header, table, *notes]),
        }
    )
    out = RESULTS / f"run-{stamp}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nJSON: {out.relative_to(ROOT)}")


def store_summary(args: argparse.Namespace, pin: Pinning) -> str:
    """Which store each Metergate target runs on, and the budgets."""
    mg = [t for t in args.targets if t.startswith("metergate")]
    parts = []
    if "metergate" in mg:
        parts.append(f"Metergate {args.store}")
    redis = [LABELS[t] for t in mg if t in REDIS_TARGETS]
    if redis:
        parts.append(
            f"{' and '.join(redis)} Redis {args.redis_version} (a redis-server of its own, "
            f"CPU {fmt_cpus(pin.load)})"
        )
    if "metergate-redis-budgets" in mg:
        parts.append(
            "MG budgets: hard monthly caps all-monthly {} and team-monthly {team}, "
            "rate team-rpm 6,000,000/min; fail_open, store_timeout_ms 50"
        )
    return " | ".join(parts)


def wait_quiet(b: Bench, max_wait: float) -> None:
    """Between measurements nothing of ours runs, so any CPU use is someone else's."""
    deadline = time.monotonic() + max_wait
    while True:
        f0 = b._snap()
        time.sleep(0.5)
        t0, m0, o0 = f0
        other = ((machine_busy() - m0) - (b.ours() - o0)) / (time.monotonic() - t0) * 100
        if other <= b.args.foreign_warn:
            return
        if time.monotonic() >= deadline:
            if max_wait > 0:
                print(
                    f"    machine still busy ({other:.0f}% of a CPU used by others); going on",
                    flush=True,
                )
            return
        print(f"    waiting: other processes use {other:.0f}% of a CPU", flush=True)
        time.sleep(1.0)


def stop_all(procs: list[Proc], tmp: Path, *, keep_tmp: bool) -> None:
    """Stop what a bench started (by PID, last started first) and remove its temp dir,
    unless ``keep_tmp``; the ``finally`` of run.py, streams.py and soak.py."""
    for proc in reversed(procs):
        proc.stop()
    if keep_tmp:
        print(f"temp dir kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_commit(p: argparse.ArgumentParser, flag: str, rev: str) -> str:
    """The full hash of ``rev``, or exit with an error naming ``flag``."""
    cp = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", rev + "^{commit}"],
        capture_output=True,
        text=True,
    )
    if cp.returncode != 0:
        p.error(f"{flag} {rev!r} is not a commit of this repository")
    return cp.stdout.strip()


def export_tree(rev: str, dest: Path) -> Path:
    """The files of commit ``rev`` in ``dest`` (``git archive``), for --metergate-rev."""
    dest.mkdir(parents=True)
    data = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def metergate_version(rev: str | None) -> str:
    """What was measured: a commit, plus "+dirty" when the work tree had changes."""

    def git(*a: str) -> str:
        try:
            cp = subprocess.run(
                ["git", "-C", str(ROOT), *a], capture_output=True, text=True, timeout=10
            )
            return cp.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    if rev:
        return git("rev-parse", "--short", rev) or rev
    head = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "proxy")
    return head + ("+dirty" if dirty else "")


def metergate_checks(
    tmap: dict[str, Target], tmp: Path, sent: Counter[str], redis: RedisServer | None
) -> dict[str, Any]:
    """Did each Metergate really meter? Ledger rows and /metrics against what clients
    sent; for the budgets target, the budgets' spend against the metered cost, holds
    left behind, refusals, and requests admitted unchecked because the store was slow."""
    checks: dict[str, Any] = {}
    for name, t in tmap.items():
        if name.startswith("metergate"):
            checks[name] = _checks_one(t, tmp, sent, redis)
    return checks


def _checks_one(
    t: Target, tmp: Path, sent: Counter[str], redis: RedisServer | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"client_completed": sent[t.name]}
    try:
        url = t.base.rsplit("/", 1)[0] + "/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        by_status: Counter[str] = Counter()
        cost = 0.0
        for line in text.splitlines():
            if line.startswith("metergate_requests_total{"):
                status = re.search(r'status="([^"]*)"', line)
                by_status[status.group(1) if status else "?"] += int(float(line.rsplit(" ", 1)[1]))
            elif line.startswith("metergate_cost_usd_total{"):
                cost += float(line.rsplit(" ", 1)[1])
        out["metered_requests"] = sum(by_status.values())
        out["metered_by_status"] = dict(by_status)
        out["metered_cost_usd"] = cost
    except (OSError, ValueError) as exc:
        out["metrics_error"] = str(exc)
    if t.name in LEDGER_FILES:
        ledger = tmp / LEDGER_FILES[t.name]
        if ledger.exists():
            try:
                with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
                    out["ledger_rows"] = db.execute("SELECT count(*) FROM ledger").fetchone()[0]
            except sqlite3.Error as exc:
                out["ledger_error"] = str(exc)
        return out
    if redis is None:
        return out
    ns = REDIS_NAMESPACES[t.name]
    try:
        out["ledger_rows"] = redis.call("ZCARD", "{" + ns + ":ledger}:lt")
        if t.name == "metergate-redis-budgets":
            budgets: dict[str, dict[str, int]] = {}
            for key in sorted(redis.call("KEYS", "{" + ns + "}:b:*")):
                spent, reserved = redis.call("HMGET", key, "spent", "reserved")
                budgets[key.decode().split(":b:", 1)[1]] = {
                    "spent_nanos": int(spent or 0),
                    "reserved_nanos": int(reserved or 0),
                }
            out["budgets"] = budgets
            out["open_reservations"] = redis.call("ZCARD", "{" + ns + "}:rx")
    except (OSError, ConnectionError, RuntimeError) as exc:
        out["redis_error"] = str(exc)
    log = t.proc.log.read_text(errors="replace") if t.proc is not None else ""
    # fail_open: a reserve the store did not answer in time admits the request unchecked
    out["admitted_unchecked"] = log.count("budget store unavailable, admitting")
    out["settles_lost"] = log.count("is lost (store and journal failed)")
    journal = tmp / ("journal-" + ns)
    files = [f for f in journal.rglob("*") if f.is_file()] if journal.exists() else []
    out["journal_bytes"] = sum(f.stat().st_size for f in files)
    return out


def render_checks(checks: dict[str, Any]) -> list[str]:
    lines = []
    for name, c in checks.items():
        line = (
            f"{LABELS[name]}: {c.get('ledger_rows')} ledger rows, "
            f"{c.get('metered_requests')} requests in /metrics, clients completed "
            f"{c.get('client_completed')}"
        )
        refused = sum(v for k, v in c.get("metered_by_status", {}).items() if "refused" in k)
        if name != "metergate":
            line += f"; refused {refused}"
        lines.append(line)
        if "budgets" in c:
            cost = c.get("metered_cost_usd", 0.0)
            by = {k: v for k, v in c.get("unchecked_by_test", {}).items() if v}
            by_test = (": " + ", ".join(f"{k} {v}" for k, v in by.items())) if by else ""
            parts = [
                f"{k} spent ${v['spent_nanos'] / 1e9:.6f}, held ${v['reserved_nanos'] / 1e9:.6f}"
                for k, v in c["budgets"].items()
            ]
            lines.append(
                f"  budgets: {'; '.join(parts) or 'NONE'} (metered cost ${cost:.6f}); "
                f"{c.get('open_reservations')} holds open; "
                f"{c.get('admitted_unchecked')} admitted unchecked (store slower than "
                f"store_timeout_ms{by_test}), {c.get('settles_lost')} settles lost, journal "
                f"{c.get('journal_bytes')} bytes"
            )
    if checks:
        lines.append("  (wrk does not count the requests cut at its end)")
    return lines


#: One MONITOR line: time, [db client-address-or-"lua"], the command, its first argument.
_MONITOR_RE = re.compile(rb'^\+\d+\.\d+ \[\d+ (\S+)\] "([^"]*)"(?: "([^"]*)")?')


def monitor_round_trips(b: Bench, seconds: float) -> dict[str, Any]:
    """Attribute the Redis round trips of metergate-redis-budgets to what sends them.

    MONITOR reports every command a client sends (one round trip each: the store sends
    one command at a time, no pipelining) and, marked ``lua``, every command a script
    runs. While it listens, wrk (or the closed-loop generator) drives the budgets target
    as in the throughput test; commands are counted when they name the target's
    namespace (the other Redis target's spec polls are left out). MONITOR slows Redis
    down, so this run is not a measurement of speed; it is not in the table.
    """
    assert b.redis is not None
    t = b.targets["metergate-redis-budgets"]
    names = script_names(b.args.metergate_src or ROOT)
    tag = ("{" + REDIS_NAMESPACES[t.name]).encode()
    sent: Counter[str] = Counter()
    in_scripts = 0
    conn = Resp(b.redis.port, timeout=None)

    def reader() -> None:
        nonlocal in_scripts
        try:
            for line in conn.rfile:
                m = _MONITOR_RE.match(line)
                if not m:
                    continue
                who, cmd, arg = m.groups()
                if who == b"lua":
                    in_scripts += 1
                elif tag in line:
                    command = cmd.decode().upper()
                    if command == "EVALSHA" and arg:
                        command += " " + names.get(arg.decode(), arg.decode()[:12])
                    sent[command] += 1
        except (OSError, ValueError):
            pass  # the socket was closed: done

    try:
        conn.send("MONITOR")
        if conn.read() != "OK":
            raise RuntimeError("Redis refused MONITOR")
        th = threading.Thread(target=reader, daemon=True)
        th.start()
        b.new_unchecked(t, "before MONITOR")
        n0 = metered_requests(t)
        if b.wrk:
            b.wrk_run(t, seconds)
            how = f"wrk -t1 -c{b.args.connections} {seconds:g} s"
        else:
            b.worker.call(b._closed_cmd(t, seconds), seconds + 60)
            how = f"aiohttp closed loop -c{b.args.connections} {seconds:g} s"
        time.sleep(0.3)
        n1 = metered_requests(t)
        time.sleep(0.2)
    finally:
        conn.close()
    th.join(timeout=10)
    n = max(1, n1 - n0)
    out = {
        "how": how,
        "requests": n1 - n0,
        "sent": dict(sent.most_common()),
        "sent_per_req": {k: v / n for k, v in sent.most_common()},
        "round_trips_per_req": sum(sent.values()) / n,
        "in_scripts_per_req": in_scripts / n,
    }
    ledger = sent.get("EVALSHA ledger_v1", 0)
    out["ledger_records_per_batch"] = (n1 - n0) / ledger if ledger else None
    b.new_unchecked(t, "MONITOR")
    b._say(f"  MONITOR: {render_monitor(out)}")
    return out


def render_monitor(m: dict[str, Any]) -> str:
    parts = []
    for k, v in m["sent_per_req"].items():
        note = ""
        if k == "EVALSHA ledger_v1" and m.get("ledger_records_per_batch"):
            note = f" (batches of {m['ledger_records_per_batch']:.1f} records)"
        elif k == "GET":
            note = " (spec-version polls, 2/s)"
        parts.append(f"{k} {v:.3f}{note}")
    return (
        f"{m['requests']} requests under {m['how']}: {m['round_trips_per_req']:.3f} commands "
        f"sent per request = {' + '.join(parts)}; {m['in_scripts_per_req']:.1f} more run "
        "inside the scripts"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _aiohttp_version() -> str:
    try:
        import aiohttp

        return aiohttp.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
