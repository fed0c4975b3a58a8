"""The fail-open journal: charges that could not reach the store, kept on local disk.

When the store is down (or slower than its timeout) the proxy keeps serving under
``on_store_error: fail_open``; every settle it could not apply is appended here, and
replayed when the store answers again. Ledger records can be journaled the same way.

On disk: one directory, one append-only JSON-lines file per process
(``journal-<pid>-<ns>.jsonl``), held under an exclusive ``flock`` while the process
lives. A line is one entry::

    {"t": "settle", "id": <reservation id>, "charges": {<budget key>: nanos}, "tokens": n}
    {"t": "ledger", "record": {...LedgerRecord.to_dict()...}}

Durability: entries are written in batches (group commit, like the ledger writer);
``record_*`` returns after the batch was written and fsync'd, so an acknowledged entry
survives a crash of the process or the machine. A crash mid-write can leave a torn
last line; replay skips lines that do not parse (only never-acknowledged entries).

Exactly once: :meth:`Journal.replay` first rotates the live file (new entries go to
a fresh one), then applies every file no live process holds, including those of
crashed processes, and deletes each file once all its entries are applied. Replay is
idempotent, so a crash in the middle (entries applied, file not yet deleted) is
harmless: the store remembers settled reservation ids for ``settled_retention_s``
(one hour by default) and ledger ids forever, and ignores a second application. The
limit: an entry whose settle did reach the store before it timed out, replayed more
than the retention later, is charged twice (see
:data:`proxy.store.base.DEFAULT_SETTLED_RETENTION_S` for why that bound is acceptable).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from proxy.errors import StoreUnavailable
from proxy.ledger import LedgerRecord, encode_record
from proxy.store.base import Store

__all__ = ["AppendFile", "Journal", "ReplayReport"]

log = logging.getLogger("metergate.journal")

_PATTERN = "journal-*.jsonl"
_REPLAY_CONCURRENCY = 64  # settles in flight at once during a replay


@dataclass(slots=True)
class ReplayReport:
    """What one :meth:`Journal.replay` did: entries applied now, entries the store had
    already applied (duplicates), unreadable lines skipped, files finished, and
    whether it stopped early because the store failed again."""

    applied: int = 0
    duplicates: int = 0
    bad_lines: int = 0
    files: int = 0
    interrupted: bool = False


class AppendFile:
    """One journal (or ledger spool) file open for appending, locked for this process."""

    def __init__(self, path: Path) -> None:
        # Created and locked under a name replays do not look at, then renamed: a
        # replay must never see (and delete) a live file before it is locked.
        temporary = path.with_name(path.name + ".new")
        self.fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.rename(temporary, path)
        self.path = path
        self.size = 0

    def write(self, data: bytes, fsync: bool) -> None:
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(self.fd, view) :]
        if fsync:
            os.fsync(self.fd)
        self.size += len(data)

    def close(self) -> None:
        os.close(self.fd)  # also releases the lock


class Journal:
    """A local append-only journal of charges (see the module docstring)."""

    def __init__(
        self, directory: str | os.PathLike[str], *, fsync: bool = True, pattern: str = _PATTERN
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.pattern = pattern  # the files replay() takes (the ledger spool has its own)
        self._file: AppendFile | None = None
        self._queue: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._io_lock = asyncio.Lock()  # one writer or rotation at a time
        self._replay_lock = asyncio.Lock()
        self.written = 0  # entries acknowledged, for metrics
        self.replayed = 0  # entries applied by replays, for metrics

    async def open(self) -> None:
        """Create the directory. The journal file itself is created on first use."""
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)

    async def close(self) -> None:
        """Wait for queued entries to be written, then close the file."""
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        async with self._io_lock:
            if self._file is not None:
                file, self._file = self._file, None
                await asyncio.to_thread(file.close)

    # -- writing -------------------------------------------------------------------

    async def record_settle(
        self, reservation_id: str, charges: Mapping[str, int], tokens: int | None
    ) -> None:
        """Journal one settle; returns once it is on disk (fsync'd)."""
        entry = {"t": "settle", "id": reservation_id, "charges": dict(charges), "tokens": tokens}
        await self._append(orjson.dumps(entry) + b"\n")

    async def record_ledger(self, records: Sequence[LedgerRecord]) -> None:
        """Journal ledger records the store did not take; returns once on disk."""
        data = b"".join(encode_record(r) for r in records)
        if data:
            await self._append(data)

    async def _append(self, data: bytes) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((data, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="metergate-journal")
        # Cancelling the caller does not withdraw the entry: it is written anyway.
        await future

    async def _flush(self) -> None:
        """Write everything queued, one write and one fsync per batch."""
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                async with self._io_lock:
                    await asyncio.to_thread(self._write_sync, b"".join(d for d, _ in batch))
            except OSError as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.written += len(batch)
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    def _write_sync(self, data: bytes) -> None:
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"journal-{os.getpid()}-{time.time_ns()}.jsonl"
            self._file = AppendFile(self.directory / name)
        self._file.write(data, self.fsync)

    # -- replaying -------------------------------------------------------------------

    def has_pending(self) -> bool:
        """True when some journal file (ours or a crashed process's) may hold entries."""
        if self._file is not None and self._file.size:
            return True
        own = None if self._file is None else self._file.path
        try:
            return any(p != own for p in self.directory.glob(self.pattern))
        except OSError:
            return False

    async def replay(self, store: Store) -> ReplayReport:
        """Apply every journal file no live process holds, then delete it.

        Stops at the first store failure (the report says ``interrupted``); what was
        applied stays applied, and the next replay skips it as a duplicate.
        """
        report = ReplayReport()
        async with self._replay_lock:
            rotated: AppendFile | None = None
            async with self._io_lock:
                if self._file is not None and self._file.size:
                    # New entries go to a fresh file; we keep the lock on the old one.
                    rotated, self._file = self._file, None
            try:
                for path in await asyncio.to_thread(self._journal_files):
                    if report.interrupted:
                        break
                    if self._file is not None and path == self._file.path:
                        continue
                    if rotated is not None and path == rotated.path:
                        await self._replay_locked(path, store, report)
                        continue
                    fd = _try_lock(path)
                    if fd is None:
                        continue  # a live process owns it
                    try:
                        await self._replay_locked(path, store, report)
                    finally:
                        os.close(fd)
            finally:
                if rotated is not None:
                    rotated.close()  # an unfinished file stays for the next replay
        self.replayed += report.applied
        return report

    def _journal_files(self) -> list[Path]:
        return sorted(self.directory.glob(self.pattern))

    async def _replay_locked(self, path: Path, store: Store, report: ReplayReport) -> None:
        """Apply one file this process holds the lock of; delete it when complete."""
        await self._replay_file(path, store, report)
        if not report.interrupted:
            await asyncio.to_thread(path.unlink, missing_ok=True)
            report.files += 1

    async def _replay_file(self, path: Path, store: Store, report: ReplayReport) -> None:
        ledger: list[LedgerRecord] = []
        settles: list[dict[str, Any]] = []
        for line in (await asyncio.to_thread(path.read_bytes)).splitlines():
            try:
                entry = orjson.loads(line)
                if entry["t"] == "settle":
                    settles.append(entry)
                elif entry["t"] == "ledger":
                    record = dict(entry["record"])
                    record["tags"] = tuple(record["tags"])
                    ledger.append(LedgerRecord(**record))
                else:
                    raise ValueError(entry["t"])
            except (ValueError, KeyError, TypeError):
                report.bad_lines += 1  # a torn last line, never acknowledged
        try:
            if ledger:
                await store.append_ledger(ledger)
                report.applied += len(ledger)
            for start in range(0, len(settles), _REPLAY_CONCURRENCY):
                chunk = settles[start : start + _REPLAY_CONCURRENCY]
                results = await asyncio.gather(
                    *(store.settle(e["id"], e["charges"], tokens=e["tokens"]) for e in chunk)
                )
                applied = sum(results)
                report.applied += applied
                report.duplicates += len(results) - applied
        except StoreUnavailable as exc:
            log.warning("journal replay of %s stopped, the store failed again: %s", path, exc)
            report.interrupted = True

    async def run_replay(self, store: Store, *, interval_s: float = 1.0) -> None:
        """Replay whenever something is pending, every ``interval_s``; runs until
        cancelled (start it as a background task next to the store)."""
        while True:
            if self.has_pending():
                try:
                    report = await self.replay(store)
                except OSError as exc:
                    log.error("journal replay failed on disk: %s", exc)
                else:
                    if report.applied or report.bad_lines:
                        log.info("journal replay: %s", report)
            await asyncio.sleep(interval_s)


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on ``path``, or None when a live process holds
    it (or it vanished: another replica replayed it meanwhile)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
