"""Lua scripts of the Redis store, loaded from package data (``proxy/store/lua``).

Each script's header documents its keys and arguments; the version is in the file
name (``budget_v2.lua``), and a changed behaviour is a new file, so that replicas of
two releases can run side by side during a deploy.
"""

from __future__ import annotations

import hashlib
import re
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from proxy.store.base import Store

__all__ = ["LuaScript", "RedisPlumbing", "text"]


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
