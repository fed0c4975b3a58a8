"""Token counting in a child process, started the first time a count is needed.

Why not in the proxy's own process: building a tiktoken vocabulary (tiktoken turns a
200,000-entry dict into its Rust ``CoreBPE``) holds the GIL for about 140 ms, and each
vocabulary keeps about 55 MiB. Loaded in the proxy, the first estimate would stall the
event loop, and every request in flight with it, for that long per vocabulary; loaded
at start-up, every process would carry 110 MiB that most never use, because providers
report usage and the proxy counts only when they do not, or when a budget must bound a
prompt over 2 KiB. In a child process the loop never waits on the GIL for counting, and
only processes that do estimate pay the memory, in the child.

The cost: a count travels to the child and back through a pipe (a few hundred
microseconds, plus copying the text), and the very first count waits for the child to
start and load its vocabulary (about a second, spent by that one request, not by the
loop). One child per proxy process; its counts run one at a time, at about 4 M tokens/s.
A child that dies is replaced on the next count.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from proxy.tokens import TokenCounter

__all__ = ["ProcessTokenCounter"]

log = logging.getLogger("metergate.tokens")

# In the child only: the counter that holds the vocabularies.
_child_counter: TokenCounter | None = None


def _init_child(vocab_dir: Path | None) -> None:
    global _child_counter
    _child_counter = TokenCounter(vocab_dir=vocab_dir)


def _child_count(text: str, model: str) -> int:
    assert _child_counter is not None
    return _child_counter.count(text, model)


class ProcessTokenCounter:
    """Counts tokens like :meth:`TokenCounter.count_async`, in a child process."""

    def __init__(self, vocab_dir: Path | None = None) -> None:
        self._vocab_dir = vocab_dir
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False
        self._lock = threading.Lock()

    def check_available(self) -> None:
        """Check that the vocabulary files are there (blocking, cheap): a proxy that
        counts lazily still refuses to start without them."""
        TokenCounter(vocab_dir=self._vocab_dir).check_available()

    @property
    def child_pid(self) -> int | None:
        """The child's process id, once it runs (for tests and diagnostics)."""
        pool = self._pool
        processes = getattr(pool, "_processes", None) or {}
        return next(iter(processes), None)

    def _get_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("This token counter is closed.")
            if self._pool is None:
                # spawn, not fork: the proxy has threads and an event loop that a forked
                # child must not inherit.
                self._pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_child,
                    initargs=(self._vocab_dir,),
                )
            return self._pool

    def _drop(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)

    async def count_async(self, text: str, model: str) -> int:
        """The tokens of ``text`` for ``model`` (see :func:`proxy.tokens.encoding_name_for_model`),
        counted in the child. A child that died is replaced once before giving up."""
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            pool = self._get_pool()
            try:
                return await loop.run_in_executor(pool, _child_count, text, model)
            except BrokenProcessPool:
                self._drop(pool)
                if attempt == 2:
                    raise
                log.warning("the token-counting process died; starting another")
        raise AssertionError("unreachable")

    def close(self, wait: bool = True) -> None:
        """Stop the child (idempotent); later counts raise RuntimeError."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
