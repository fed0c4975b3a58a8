"""Lua scripts of the Redis store, loaded from package data (``proxy/store/lua``).

Each script's header documents its keys and arguments; the version is in the file
name (``budget_v2.lua``), and a changed behaviour is a new file, so that replicas of
two releases can run side by side during a deploy.

:class:`ScriptPipe` sends the script calls of one process over one pipelined
connection of its own (see its docstring): the budget and ledger scripts are the hot
path, and redis-py's pool, retry and stream machinery cost more per call than the
call's own work.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, cast

import hiredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.store.base import Store

__all__ = ["LuaScript", "RedisPlumbing", "ScriptPipe", "text"]


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script from package data, with the SHA1 that EVALSHA names it by."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> LuaScript:
        """Read ``lua/<name>`` from the package. A line ``-- #include OTHER.lua`` is
        replaced by that file's text (Redis scripts cannot import, and the budget
        scripts share their clock and expiry sweep)."""
        source = _INCLUDE.sub(lambda m: _read(m.group(1)), _read(name))
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


_INCLUDE = re.compile(r"^-- #include (\S+\.lua)$", re.M)


def _read(name: str) -> str:
    return resources.files("proxy.store").joinpath(f"lua/{name}").read_text("utf-8")


def text(value: Any) -> str:
    """A reply value as text (redis-py returns bytes unless told to decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisPlumbing(Store):
    """What the per-feature halves of :class:`~proxy.store.redis.RedisStore` (specs,
    keys, alerts) need from it: the namespace and two ways to talk to Redis."""

    namespace: str

    @abstractmethod
    async def _command(self, *args: Any) -> Any:
        """Run one Redis command, translating failures (provided by the store)."""

    @abstractmethod
    async def _eval(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script by SHA, loading it when the server lost it (provided by the store)."""

    @property
    def _tag(self) -> str:
        """The namespace's hash tag, ``{ns}``: every key of one feature in one slot."""
        return "{" + self.namespace + "}"


#: RESP packing in C (hiredis's stub types its argument as a 1-tuple).
_pack = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)

#: redis-py connection options a ScriptPipe handles itself, or that do not change what
#: goes over the wire; a client built with any other (TLS, a Unix socket, RESP3, a
#: client name, a credential provider...) keeps redis-py for its scripts too.
_PIPE_OPTIONS: Final = frozenset(
    {
        "host",
        "port",
        "db",
        "username",
        "password",
        "socket_timeout",
        "socket_connect_timeout",
        "himport_registry",
        "maint_notifications_pool_handler",
        "maint_notifications_config",
        "orig_host_address",
        "orig_socket_timeout",
        "orig_socket_connect_timeout",
        "retry",
        "max_connections",
    }
)


class ScriptPipe:
    """Script calls over ONE pipelined connection, in the order they were made.

    Why: under load the budget gate and the ledger writer each send about one script
    call per batch, and through redis-py every call pays a pool checkout and release
    (an ``asyncio.Lock`` each), a ``Retry`` wrapper, argument packing in Python and a
    StreamReader read: about as much proxy CPU as the batch's own work, and far more
    per request when the proxy is idle and every request is its own batch. Here a call
    is packed by hiredis in C, appended to a buffer that is written once per turn of the
    event loop (a settle and a ledger write made in the same turn share one write and,
    usually, one read), and its reply completes a plain future from ``data_received``.

    Semantics kept from the pooled client: one connection failure fails the calls in
    flight with ``ConnectionError`` (the caller turns it into StoreUnavailable, and the
    budget gate's journal takes settles), and the next call connects again; no reply
    for ``socket_timeout`` while calls wait aborts the connection with ``TimeoutError``.
    A caller that stops waiting (the gate's store timeout, a cancelled request) does
    not break the connection: its reply is read and dropped, and the calls behind it
    keep their order. Calls reach Redis in the order they were made, so a release sent
    after a reserve that timed out can never overtake it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout_s: float | None = None,
        reply_timeout_s: float | None = None,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self._auth: tuple[str, ...] = ()
        if password is not None:
            self._auth = ("AUTH", password) if username is None else ("AUTH", username, password)
        self.connect_timeout_s = connect_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self._conn: _PipeConnection | None = None
        self._connecting: asyncio.Future[_PipeConnection] | None = None
        self.connections = 0  # connections made, for tests

    @classmethod
    def for_client(cls, connection_class: type, kwargs: Mapping[str, Any]) -> ScriptPipe | None:
        """A pipe to the server a redis-py pool connects to, or None when its options
        need redis-py (TLS, a Unix socket, RESP3...)."""
        if connection_class is not Connection or not set(kwargs) <= _PIPE_OPTIONS:
            return None
        return cls(
            kwargs.get("host", "localhost"),
            int(kwargs.get("port", 6379)),
            db=int(kwargs.get("db", 0) or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            connect_timeout_s=kwargs.get("socket_connect_timeout"),
            reply_timeout_s=kwargs.get("socket_timeout"),
        )

    async def call(self, *args: Any) -> Any:
        """Send one command, return its reply; a Redis error reply is raised as
        ``ResponseError`` (``NoScriptError`` for NOSCRIPT)."""
        conn = self._conn
        if conn is None or conn.closed or conn.loop is not asyncio.get_running_loop():
            conn = await self._connect()
        return await conn.send(_pack(args))

    async def _connect(self) -> _PipeConnection:
        # Concurrent callers share one attempt.
        connecting = self._connecting
        if connecting is None or connecting.get_loop() is not asyncio.get_running_loop():
            connecting = self._connecting = asyncio.ensure_future(self._open())
            connecting.add_done_callback(self._connected)
        return await asyncio.shield(connecting)

    def _connected(self, attempt: asyncio.Future[_PipeConnection]) -> None:
        if self._connecting is attempt:
            self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            old, self._conn = self._conn, attempt.result()
            if old is not None and old is not self._conn:
                with contextlib.suppress(RuntimeError):  # its event loop is closed
                    old.close()

    async def _open(self) -> _PipeConnection:
        loop = asyncio.get_running_loop()
        conn = _PipeConnection(loop, self.reply_timeout_s)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await loop.create_connection(lambda: conn, self.host, self.port)
                # The handshake goes first on the wire; its replies are checked here.
                handshake = []
                if self._auth:
                    handshake.append(conn.send(_pack(self._auth)))
                if self.db:
                    handshake.append(conn.send(_pack(("SELECT", self.db))))
                await asyncio.gather(*handshake)  # the first error; the others are read
        except TimeoutError as exc:
            conn.close()
            raise RedisTimeoutError(f"Timeout connecting to {self.host}:{self.port}.") from exc
        except OSError as exc:
            conn.close()
            raise RedisConnectionError(
                f"Error connecting to {self.host}:{self.port}: {exc}."
            ) from exc
        except BaseException:
            conn.close()
            raise
        self.connections += 1
        return conn

    def close(self) -> None:
        """Close the connection; calls in flight fail, the next call connects again."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


#: TCP keepalive of the pipe's connection: probe after 30 s idle, every 10 s, give up
#: after 3 unanswered (a Redis that vanished behind a NAT or a failover is found within
#: a minute, before the next budget call has to wait out its reply timeout on it).
KEEPALIVE_IDLE_S: Final = 30
KEEPALIVE_INTERVAL_S: Final = 10
KEEPALIVE_PROBES: Final = 3


def _keep_alive(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),  # Linux; macOS names it TCP_KEEPALIVE
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
            ("TCP_KEEPCNT", KEEPALIVE_PROBES),
        ):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:  # not a TCP socket
        pass


class _PipeConnection(asyncio.Protocol):
    """One connection of a :class:`ScriptPipe`: replies complete its waiters in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reply_timeout_s: float | None) -> None:
        self.loop = loop
        self.reply_timeout_s = reply_timeout_s
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reader = hiredis.Reader()
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._out: list[bytes] = []
        self._progress = 0.0  # loop time of the last reply (or of the first waiter)
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        _keep_alive(transport.get_extra_info("socket"))
        if self._out:
            self._write()

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        if self.closed:
            raise RedisConnectionError("The Redis connection is closed.")
        future: asyncio.Future[Any] = self.loop.create_future()
        if not self._waiters:
            self._progress = self.loop.time()
            if self._watchdog is None and self.reply_timeout_s is not None:
                self._watchdog = self.loop.call_at(
                    self._progress + self.reply_timeout_s, self._check_progress
                )
        self._waiters.append(future)
        if not self._out and self.transport is not None:
            # Written at the end of this turn of the loop, with whatever else is sent in it.
            self.loop.call_soon(self._write)
        self._out.append(packed)
        return future

    def _write(self) -> None:
        if self._out and self.transport is not None and not self.closed:
            out, self._out = self._out, []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiters = self._waiters
        try:
            while (reply := reader.gets()) is not False:
                future = waiters.popleft()
                if future.done():
                    continue  # its caller stopped waiting
                if isinstance(reply, hiredis.ReplyError):
                    message = str(reply)
                    error = (NoScriptError if message.startswith("NOSCRIPT") else ResponseError)(
                        message
                    )
                    future.set_exception(error)
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self._abort(RedisConnectionError(f"Redis sent a reply this client cannot read: {exc}"))
            return
        self._progress = self.loop.time()

    def _check_progress(self) -> None:
        self._watchdog = None
        if self.closed or not self._waiters or self.reply_timeout_s is None:
            return
        due = self._progress + self.reply_timeout_s
        if self.loop.time() >= due:
            self._abort(RedisTimeoutError("Timeout reading from Redis."))
        else:
            self._watchdog = self.loop.call_at(due, self._check_progress)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"The connection to Redis was lost ({exc or 'closed'})."))

    def _abort(self, exc: Exception) -> None:
        self._fail(exc)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        self._out = []
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiters, self._waiters = self._waiters, deque()
        for future in waiters:
            if not future.done():
                future.set_exception(exc)

    def close(self) -> None:
        self._fail(RedisConnectionError("The Redis connection was closed."))
        if self.transport is not None:
            self.transport.close()
