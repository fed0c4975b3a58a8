"""WAL checkpoints of the embedded store, on their own thread and connection.

Why. With SQLite's default (``wal_autocheckpoint`` = 1,000 pages) the COMMIT that
takes the WAL past 4 MiB runs the checkpoint itself: it fdatasyncs the WAL, copies the
pages into the database and fdatasyncs that, and the next COMMIT syncs the new WAL
header. That COMMIT runs on the store's one thread, so every budget reserve and settle
and every ledger batch of the proxy waits behind those syncs. Under the soak's load
(200 requests/s with budgets: ~55 KiB of WAL per request, a checkpoint every 0.3 s) the
store thread made ~9 fdatasyncs a second, and on this shared VM one of them sometimes
took 100-500 ms: each such stall made reserves miss ``store_timeout_ms`` (admitted
unchecked under fail_open) and piled up the requests in flight (bench/README.md, soak).

What. :class:`Checkpointer` runs ``PRAGMA wal_checkpoint(PASSIVE)`` every
``interval_s`` on a connection of its own, in a thread of its own: the copying and
the big syncs happen there. PASSIVE never waits for the writer and never blocks it.
It cannot finish the WAL alone while writes keep coming (frames appended during a
checkpoint are left for the next one, so the WAL would grow without end), so the
store's connection keeps an automatic checkpoint, at :data:`WAL_AUTOCHECKPOINT_PAGES`
(64 MiB) instead of 4 MiB: when it runs, the background checkpoints have already
copied and synced nearly every frame, so it syncs only the last second's frames.
Measured side by side (bench of the store alone under that load, 30 s each, twice):
syncs on the store thread 263-266 → 21, their total 0.40-0.85 s → 0.03 s, the slowest
344 ms → 8 ms; reserves over 50 ms 13-61 → 0.

Durability is unchanged: the same syncs (WAL before copying, database after) happen
in the same order, on another thread. ``journal_size_limit`` truncates the WAL back to
64 MiB after a reset, so the file stays bounded.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Final

__all__ = ["DEFAULT_INTERVAL_S", "WAL_AUTOCHECKPOINT_PAGES", "WAL_SIZE_LIMIT_BYTES", "Checkpointer"]

log = logging.getLogger("metergate.store")

DEFAULT_INTERVAL_S: Final = 1.0
#: The store connection's own (last-resort) checkpoint: 16,384 pages of 4 KiB.
WAL_AUTOCHECKPOINT_PAGES: Final = 16_384
WAL_SIZE_LIMIT_BYTES: Final = 64 * 1024 * 1024


class Checkpointer:
    """A thread that checkpoints ``path``'s WAL every ``interval_s`` (see the module
    docstring). ``start`` and ``stop`` may be called from any thread; ``stop`` blocks
    until the thread has ended (at most one checkpoint)."""

    def __init__(
        self,
        path: str,
        synchronous: str,
        busy_timeout_ms: int,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self.interval_s = interval_s
        self.checkpoints = 0  # completed runs, for tests and diagnostics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("The checkpointer is already running.")
        self._thread = threading.Thread(
            target=self._run, name="metergate-sqlite-checkpoint", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        except sqlite3.Error as exc:
            log.warning("SQLite checkpointer for %s could not start: %s", self.path, exc)
            return
        failing = False
        configured = False
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    if not configured:  # (can meet a lock too, so it is retried here)
                        conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
                        # Checkpoint syncs follow the checkpointing connection's setting.
                        conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
                        configured = True
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    # Not fatal: the store connection's own checkpoint still runs.
                    if not failing:
                        log.warning("SQLite checkpoint of %s failed: %s", self.path, exc)
                    failing = True
                else:
                    failing = False
                    self.checkpoints += 1
        finally:
            conn.close()
