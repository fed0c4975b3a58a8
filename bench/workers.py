"""``metergate serve --workers N``: throughput with 1 worker against 2, side by side.

Starts the fake upstream and two Metergate instances (``--workers 1`` and
``--workers 2``, same config apart from the port: SQLite ledger, metering, metrics in
multiprocess mode for the 2-worker one, access log on), then alternates ``wrk -t1 -c50``
runs against the two, round after round, and prints RPS, the proxy processes' CPU per
request (all workers summed) and the ratio. Nothing is pinned: the point is to let the
second worker use a second core. On a 2-CPU machine the fake upstream and wrk need
part of a core themselves, so the ratio shown is what this machine allows, not the
scaling of the proxy alone; the CPU per request (which should not change with the
number of workers) is the number that says whether the workers scale.

    .venv/bin/python bench/workers.py              # 3 rounds of 5 s each, ~1 minute
    .venv/bin/python bench/workers.py --seconds 3 --rounds 1
    .venv/bin/python bench/workers.py --upstream nginx

``--upstream nginx`` answers with nginx (Debian's, ``apt-get install -y nginx-light``)
instead of the Python fake: a fixed chat completion with usage, after checking the
upstream key, for ~20 µs of CPU instead of ~150. With wrk (C) that leaves most of the
second core to the second worker, which is as close to "the cores are free" as a
2-CPU machine gets.

Everything it starts it stops by PID. Needs ``wrk``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import (
    CHAT_BODY,
    METERGATE_KEY,
    ROOT,
    UPSTREAM_KEY,
    WRK_LUA,
    Proc,
    cpu_seconds,
    free_port,
    machine_busy,
    metergate_config,
    nginx_preamble,
)

ALL_CPUS = os.sched_getaffinity(0)


def tree(pid: int) -> list[int]:
    """``pid`` and its children (the supervisor and its workers)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


#: nginx's answer: a chat completion with usage, as the provider sends it (~0.6 KB).
NGINX_ANSWER = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1790000000,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 12,
        "completion_tokens": 9,
        "total_tokens": 21,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
    "system_fingerprint": "fp_bench",
}


def nginx_config(tmp: Path, port: int) -> Path:
    """A foreground, single-process nginx on ``port`` that answers the chat path with
    :data:`NGINX_ANSWER` when the upstream key is the bench's, 401 otherwise."""
    body = json.dumps(NGINX_ANSWER, separators=(",", ":")).replace("'", "\\'")
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""{nginx_preamble(tmp, 1024)}
  server {{
    listen 127.0.0.1:{port};
    location = /_fake/health {{ return 200 "ok"; }}
    location = /v1/chat/completions {{
      if ($http_authorization != "Bearer {UPSTREAM_KEY}") {{ return 401; }}
      default_type application/json;
      return 200 '{body}';
    }}
  }}
}}
"""
    )
    return conf


def wrk(url: str, script: Path, seconds: int, connections: int) -> float:
    cp = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    for line in cp.stdout.splitlines():
        if line.startswith("WRKJSON "):
            out = json.loads(line[8:])
            errors = {k: v for k, v in out.items() if k.startswith("err_") and v}
            if errors:  # a non-2xx answer (err_status) would make the figure meaningless
                raise RuntimeError(f"wrk saw errors against {url}: {errors}")
            return float(out["requests"] / (out["duration_us"] / 1e6))
    raise RuntimeError(f"wrk gave no summary:\n{cp.stdout}\n{cp.stderr}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument(
        "--upstream",
        choices=("fake", "nginx"),
        default="fake",
        help="who answers: bench/fake_server.py, or nginx with a fixed answer (cheaper)",
    )
    args = p.parse_args(argv)
    if args.upstream == "nginx" and shutil.which("nginx") is None:
        print("--upstream nginx needs nginx (apt-get install -y nginx-light)", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("bench/workers.py needs wrk (apt-get install -y wrk)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="mg-workers-bench-"))
    procs: list[Proc] = []
    fake_argv = ["bench/fake_server.py", "--require-key", UPSTREAM_KEY]
    try:
        fake_port = free_port()
        if args.upstream == "nginx":
            conf = nginx_config(tmp, fake_port)
            argv_up = ["nginx", "-p", str(tmp), "-c", str(conf)]
        else:
            argv_up = [sys.executable, *fake_argv, "--port", str(fake_port)]
        fake = Proc(args.upstream, argv_up, ALL_CPUS, tmp / f"{args.upstream}.log")
        procs.append(fake)
        fake.start()
        fake.wait_ready(f"http://127.0.0.1:{fake_port}/_fake/health")
        ports: dict[int, int] = {}
        mg: dict[int, Proc] = {}
        for n in (1, 2):
            ports[n] = free_port()
            cfg = tmp / f"mg{n}.yaml"
            metergate_config(cfg, ports[n], fake_port, f"sqlite:///{tmp}/ledger{n}.db", True)
            proc = Proc(
                f"metergate-w{n}",
                [str(ROOT / ".venv/bin/metergate"), "serve", "-c", str(cfg), "--workers", str(n)],
                ALL_CPUS,
                tmp / f"mg{n}.log",
            )
            procs.append(proc)
            proc.start()
            mg[n] = proc
        for n, proc in mg.items():
            proc.wait_ready(f"http://127.0.0.1:{ports[n]}/readyz")
        time.sleep(1.0)  # the second worker of mg[2] may bind a moment after the first
        script = tmp / "wrk.lua"
        script.write_text(WRK_LUA.format(body=json.dumps(CHAT_BODY.decode()), auth=METERGATE_KEY))
        url = {n: f"http://127.0.0.1:{ports[n]}/openai/v1/chat/completions" for n in mg}
        for n in mg:
            wrk(url[n], script, 1, args.connections)  # warm-up
        rps: dict[int, list[float]] = {1: [], 2: []}
        cpu_us: dict[int, list[float]] = {1: [], 2: []}
        busy: list[float] = []
        for r in range(args.rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            for n in order:
                pids = tree(mg[n].pid)
                before = sum(cpu_seconds(pid) for pid in pids)
                b0 = machine_busy()
                t0 = time.monotonic()
                got = wrk(url[n], script, args.seconds, args.connections)
                elapsed = time.monotonic() - t0
                used = sum(cpu_seconds(pid) for pid in pids) - before
                busy.append((machine_busy() - b0) / elapsed)
                rps[n].append(got)
                cpu_us[n].append(used / (got * args.seconds) * 1e6)
                print(
                    f"round {r + 1} workers={n}: {got:7.0f} req/s, proxy CPU "
                    f"{cpu_us[n][-1]:.0f} µs/request ({len(pids) - 1 or 1} process(es))",
                    flush=True,
                )
        m = {n: statistics.median(v) for n, v in rps.items()}
        c = {n: statistics.median(v) for n, v in cpu_us.items()}
        print()
        print(
            f"metergate serve --workers N, {len(ALL_CPUS)} CPUs, nothing pinned, upstream "
            f"{args.upstream}, wrk -t1 -c{args.connections} {args.seconds} s x {args.rounds} "
            "rounds (median)"
        )
        print(f"{'':32}{'1 worker':>10}{'2 workers':>11}{'ratio':>8}")
        print(f"{'throughput, req/s':32}{m[1]:>10.0f}{m[2]:>11.0f}{m[2] / m[1]:>7.2f}x")
        print(f"{'proxy CPU per request, µs':32}{c[1]:>10.0f}{c[2]:>11.0f}{c[2] / c[1]:>7.2f}x")
        print(f"machine busy during the runs (all processes): up to {max(busy):.0%} of a CPU")
        return 0
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
