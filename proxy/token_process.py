"""Token counting in a child process, started the first time a count is needed.

Why not in the proxy's own process: building a tiktoken vocabulary (tiktoken turns a
200,000-entry dict into its Rust ``CoreBPE``) holds the GIL for about 140 ms, and each
vocabulary keeps 30-75 MiB. Loaded in the proxy, the first estimate would stall the
event loop, and every request in flight with it, for that long per vocabulary; loaded
at start-up, every process would carry memory that most never use, because providers
report usage and the proxy counts only when they do not, or when a budget must bound a
prompt over 2 KiB. In a child process the loop never waits on the GIL for counting, and
only processes that do estimate pay the memory, in the child.

**A lean child.** The child is ``python -m proxy.token_process [vocab_dir]``: it imports
this module and :mod:`proxy.tokens` (tiktoken) and nothing of the proxy's CLI, web
server or store clients (multiprocessing's ``spawn`` re-imported the ``metergate`` entry
point, ~25 MiB of modules the child never used, and started a resource tracker process,
13 MiB more). It loads only the vocabularies that counts ask for, and keeps only
tiktoken's Rust copy of each (:class:`proxy.tokens.TokenCounter` with ``lean=True``):
about 24 MiB with none loaded, 70 MiB with ``o200k_base``, 95 MiB with both.

**The pipe.** Requests go down the child's stdin and answers come back on its stdout,
in order (the child counts one text at a time), as length-prefixed frames. The proxy's
side is non-blocking and driven by its event loop (``add_reader``/``add_writer``): no
thread, no pickling, no wake-up pipe; a big text is written as the pipe drains.

The cost: a count travels to the child and back through the pipe (tens of
microseconds, plus copying the text), and the very first count waits for the child to
start and load its vocabulary (about a second, spent by that one request, not by the
loop). One child per proxy process; its counts run one at a time, at about 4 M
tokens/s. A child that dies (end of file on its stdout, or a broken pipe) fails the
counts it had, which are retried once on a new child started on the spot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import IO, BinaryIO, Final

from proxy.tokens import TokenCounter, TokenizerUnavailable

__all__ = ["ProcessTokenCounter"]

log = logging.getLogger("metergate.tokens")

#: Request frame header: UTF-8 byte lengths of the model name and of the text, which
#: follow it.
_REQUEST: Final = struct.Struct("!II")
#: Answer frame header: a kind byte, and the byte length of the payload that follows.
#: ``=`` the count in ASCII digits; ``U`` a TokenizerUnavailable message; ``!`` any
#: other error, as "ExceptionName: message".
_ANSWER: Final = struct.Struct("!cI")
_READ_SIZE: Final = 64 * 1024
#: How long ``close`` waits for a killed child to be reaped.
_REAP_TIMEOUT_S: Final = 5.0


class _ChildGone(Exception):
    """The child ended (or its pipe broke) before answering."""


class _Child:
    """One running child and its end of the pipe, driven by one event loop.

    Everything but :meth:`kill` runs on the loop's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, vocab_dir: Path | None) -> None:
        argv = [sys.executable, "-m", "proxy.token_process"]
        if vocab_dir is not None:
            argv.append(str(vocab_dir))
        # stderr is inherited: the child's warnings land in the proxy's log stream.
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.loop = loop
        self._to: IO[bytes] | None = self.proc.stdin
        self._from: IO[bytes] | None = self.proc.stdout
        self._to_fd = self.proc.stdin.fileno()
        self._from_fd = self.proc.stdout.fileno()
        os.set_blocking(self._to_fd, False)
        os.set_blocking(self._from_fd, False)
        self._unsent: deque[memoryview] = deque()
        self._writer_armed = False
        self._received = bytearray()
        self._waiting: deque[asyncio.Future[int]] = deque()
        self.gone = False
        loop.add_reader(self._from_fd, self._on_readable)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def request(self, text: str, model: str) -> asyncio.Future[int]:
        """Queue one count; the future gets the count, or :class:`_ChildGone`."""
        if self.gone:
            raise _ChildGone("the token-counting process has ended")
        model_bytes = model.encode("utf-8", "surrogatepass")
        text_bytes = text.encode("utf-8", "surrogatepass")
        future: asyncio.Future[int] = self.loop.create_future()
        self._waiting.append(future)
        self._unsent.append(memoryview(_REQUEST.pack(len(model_bytes), len(text_bytes))))
        self._unsent.append(memoryview(model_bytes))
        if text_bytes:
            self._unsent.append(memoryview(text_bytes))
        if not self._writer_armed:
            self._write()
        return future

    def _write(self) -> None:
        while self._unsent:
            chunk = self._unsent[0]
            try:
                n = os.write(self._to_fd, chunk)
            except BlockingIOError:
                n = 0
            except OSError as exc:  # BrokenPipeError: the child is gone
                self._end(exc)
                return
            if n < len(chunk):
                self._unsent[0] = chunk[n:]
                if not self._writer_armed:
                    self.loop.add_writer(self._to_fd, self._write)
                    self._writer_armed = True
                return
            self._unsent.popleft()
        if self._writer_armed:
            self.loop.remove_writer(self._to_fd)
            self._writer_armed = False

    def _on_readable(self) -> None:
        try:
            data = os.read(self._from_fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._end(exc)
            return
        if not data:
            self._end(None)
            return
        buf = self._received
        buf += data
        while len(buf) >= _ANSWER.size:
            kind, size = _ANSWER.unpack_from(buf)
            end = _ANSWER.size + size
            if len(buf) < end:
                break
            payload = bytes(buf[_ANSWER.size : end])
            del buf[:end]
            if not self._waiting:  # cannot happen with a sane child
                self._end(RuntimeError("the token-counting process answered unasked"))
                return
            future = self._waiting.popleft()
            if future.done():  # its caller was cancelled; the answer is not needed
                continue
            if kind == b"=":
                future.set_result(int(payload))
            elif kind == b"U":
                future.set_exception(TokenizerUnavailable(payload.decode("utf-8", "replace")))
            else:
                future.set_exception(RuntimeError(payload.decode("utf-8", "replace")))

    def _end(self, cause: BaseException | None) -> None:
        """The child is gone (or must go): fail what it still owed, release the pipe."""
        if self.gone:
            return
        self.gone = True
        self.loop.remove_reader(self._from_fd)
        if self._writer_armed:
            self.loop.remove_writer(self._to_fd)
            self._writer_armed = False
        self._unsent.clear()
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                gone = _ChildGone("the token-counting process ended before answering")
                gone.__cause__ = cause
                future.set_exception(gone)
        for pipe in (self._to, self._from):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self._to = self._from = None
        self.kill()
        if self.proc.poll() is None and self.loop.is_running():
            # Reap it without blocking the loop (a killed child exits at once).
            self.loop.run_in_executor(None, self.proc.wait)

    def kill(self) -> None:
        """Kill the child (any thread; idempotent)."""
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def close_from(self, thread_safe: bool) -> None:
        """End this child's side: on the loop's thread when ``thread_safe`` (the loop
        runs in another thread), else right here."""
        if self.loop.is_closed():
            return
        if thread_safe:
            self.loop.call_soon_threadsafe(self._end, None)
        else:
            self._end(None)


class ProcessTokenCounter:
    """Counts tokens like :meth:`TokenCounter.count_async`, in a child process."""

    def __init__(self, vocab_dir: Path | None = None) -> None:
        self._vocab_dir = vocab_dir
        self._child: _Child | None = None
        self._closed = False
        self._lock = threading.Lock()

    def check_available(self) -> None:
        """Check that the vocabulary files are there (blocking, cheap): a proxy that
        counts lazily still refuses to start without them."""
        TokenCounter(vocab_dir=self._vocab_dir).check_available()

    @property
    def child_pid(self) -> int | None:
        """The child's process id, once it runs (for tests and diagnostics)."""
        child = self._child
        return None if child is None or child.gone else child.pid

    def _get_child(self, loop: asyncio.AbstractEventLoop) -> _Child:
        with self._lock:
            if self._closed:
                raise RuntimeError("This token counter is closed.")
            child = self._child
            if child is not None and not child.gone and child.loop is loop:
                return child
            self._child = None
        if child is not None and not child.gone:  # started on another event loop
            child.kill()
            child.close_from(thread_safe=child.loop.is_running())
        new = _Child(loop, self._vocab_dir)
        with self._lock:
            if self._closed:  # closed while starting
                new._end(None)
                raise RuntimeError("This token counter is closed.")
            self._child = new
        return new

    def _drop(self, child: _Child) -> None:
        with self._lock:
            if self._child is child:
                self._child = None

    async def count_async(self, text: str, model: str) -> int:
        """The tokens of ``text`` for ``model`` (see :func:`proxy.tokens.encoding_name_for_model`),
        counted in the child. A child that died is replaced once before giving up."""
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            child = self._get_child(loop)
            try:
                return await child.request(text, model)
            except _ChildGone:
                self._drop(child)
                if self._closed:
                    raise RuntimeError("This token counter is closed.") from None
                if attempt == 2:
                    raise
                log.warning("the token-counting process died; starting another")
        raise AssertionError("unreachable")

    def close(self, wait: bool = True) -> None:
        """Stop the child (idempotent; any thread); later counts raise RuntimeError.
        With ``wait``, return once the child has ended and been reaped."""
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
        if child is None:
            return
        child.kill()
        try:
            on_loop_thread = asyncio.get_running_loop() is child.loop
        except RuntimeError:
            on_loop_thread = False
        child.close_from(thread_safe=child.loop.is_running() and not on_loop_thread)
        if wait:
            try:
                child.proc.wait(timeout=_REAP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("the token-counting process %d did not end", child.pid)


# -- the child -----------------------------------------------------------------------


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n) if n else b""
    return data if data is not None and len(data) == n else None


def _child_main(argv: list[str]) -> None:
    """Answer counts from stdin on stdout until stdin ends (the proxy closed it or died)."""
    # Ctrl-C in a terminal reaches the whole process group: the proxy stops this child.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The protocol owns the original stdout; anything printed goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    counter = TokenCounter(vocab_dir=Path(argv[0]) if argv else None, lean=True)
    while True:
        head = _read_exactly(inp, _REQUEST.size)
        if head is None:
            return
        model_len, text_len = _REQUEST.unpack(head)
        model_bytes = _read_exactly(inp, model_len)
        text_bytes = _read_exactly(inp, text_len)
        if model_bytes is None or text_bytes is None:
            return
        model = model_bytes.decode("utf-8", "surrogatepass")
        text = text_bytes.decode("utf-8", "surrogatepass")
        del text_bytes
        try:
            kind, payload = b"=", str(counter.count(text, model)).encode()
        except TokenizerUnavailable as exc:
            kind, payload = b"U", str(exc).encode("utf-8", "replace")
        except Exception as exc:
            kind, payload = b"!", f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
        out.write(_ANSWER.pack(kind, len(payload)) + payload)
        out.flush()


if __name__ == "__main__":
    _child_main(sys.argv[1:])
