"""``metergate serve --workers N``: N proxy processes on one port.

DESIGN §3 says one process per core. Each worker is a full ``metergate serve`` process
(its own event loop, upstream client and store connection) listening on the same port
with ``SO_REUSEPORT``, so the kernel spreads incoming connections over them; they
share nothing but the store, exactly like replicas on different hosts. So ``--workers``
needs a store the processes can share: a SQLite file or Redis, not ``memory://``.

The supervisor (this module, in the process you started) does no request work:

- it starts the workers as fresh interpreters (``python -m proxy.cli serve ...``), not
  forks, so that no event loop, thread or socket is inherited, and so that
  prometheus-client sees ``PROMETHEUS_MULTIPROC_DIR`` when it is first imported;
- it forwards SIGTERM and SIGINT to every worker (each then shuts down gracefully, as
  a single process does) and waits for them, killing any still running after
  ``server.shutdown_grace_s`` + :data:`KILL_MARGIN_S`; it exits 0 after a requested stop;
- it restarts a worker that dies on its own, unless it died within
  :data:`MIN_UPTIME_S` of its start (a crash loop, e.g. a config the workers reject):
  then it stops the others and exits 1.

Metrics: every worker runs prometheus-client in multiprocess mode on one directory the
supervisor creates (and removes at exit), so ``/metrics`` answered by any worker reports
the totals of all of them; see :mod:`proxy.metrics`. The alternative, a metrics port
per worker, would make every Prometheus job list N targets per host and every dashboard
sum over them; multiprocess mode costs a memory-mapped write per counter update instead
of an in-memory one (about the same price: both take a lock).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

from prometheus_client import multiprocess

log = logging.getLogger("metergate.workers")

#: A worker that dies sooner than this after its start is not restarted (crash loop).
MIN_UPTIME_S = 5.0
#: Extra time, past the graceful shutdown, before a stopping worker is killed.
KILL_MARGIN_S = 5.0
#: How often the supervisor looks at its workers.
POLL_S = 0.2
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Starts, watches and stops the worker processes of one ``serve --workers N``."""

    def __init__(self, worker_argv: Sequence[str], n: int, grace_s: float) -> None:
        """``worker_argv``: the ``serve`` arguments (config, host, port, log level) each
        worker gets; the supervisor adds the worker flags."""
        if n < 1:
            raise ValueError(f"--workers must be at least 1, not {n}.")
        self.worker_argv = list(worker_argv)
        self.n = n
        self.grace_s = grace_s
        self.workers: dict[int, _Worker] = {}
        self.metrics_dir = ""
        self._stop_signal: int | None = None

    def run(self) -> int:
        """Run until a stop signal or a crash loop; the process exit status."""
        self.metrics_dir = tempfile.mkdtemp(prefix="metergate-metrics-")
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for i in range(self.n):
                self._start(i)
            log.info(
                "supervisor %d: %d workers (pids %s), metrics in %s",
                os.getpid(),
                self.n,
                ", ".join(str(w.proc.pid) for w in self.workers.values()),
                self.metrics_dir,
            )
            status = self._watch()
            self._stop_all(self._stop_signal or signal.SIGTERM)
            return status
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _start(self, index: int) -> None:
        argv = [
            sys.executable,
            "-m",
            "proxy.cli",
            "serve",
            *self.worker_argv,
            "--worker-index",
            str(index),
            "--metrics-dir",
            self.metrics_dir,
        ]
        env = dict(os.environ)
        env[MULTIPROC_ENV] = self.metrics_dir
        # Own process group: a terminal's Ctrl-C reaches the supervisor only, which
        # forwards it once, rather than every worker twice.
        proc = subprocess.Popen(argv, env=env, process_group=0)
        self.workers[index] = _Worker(index, proc)

    def _watch(self) -> int:
        while self._stop_signal is None:
            time.sleep(POLL_S)
            for index, worker in list(self.workers.items()):
                code = worker.proc.poll()
                if code is None or self._stop_signal is not None:
                    continue
                self._mark_dead(worker.proc.pid)
                uptime = time.monotonic() - worker.started
                if uptime < MIN_UPTIME_S:
                    log.error(
                        "worker %d (pid %d) exited with status %s %.1f s after its start; "
                        "not restarting (see its messages above). Stopping.",
                        index,
                        worker.proc.pid,
                        code,
                        uptime,
                    )
                    return 1
                log.warning(
                    "worker %d (pid %d) exited with status %s; restarting it",
                    index,
                    worker.proc.pid,
                    code,
                )
                self._start(index)
        return 0

    def _stop_all(self, signum: int) -> None:
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(signum)
        deadline = time.monotonic() + self.grace_s + KILL_MARGIN_S
        for worker in self.workers.values():
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error(
                    "worker %d (pid %d) did not stop; killing it", worker.index, worker.proc.pid
                )
                worker.proc.kill()
                worker.proc.wait()

    def _mark_dead(self, pid: int) -> None:
        # Only live-mode gauges need this (we have none); harmless, and keeps the
        # directory tidy if such gauges are ever added.
        multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
