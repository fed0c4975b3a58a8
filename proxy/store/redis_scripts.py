"""Lua scripts of the Redis store, loaded from package data (``proxy/store/lua``).

Each script's header documents its keys and arguments; the version is in the file
name (``reserve_v1.lua``), and a changed behaviour is a new file, so that replicas of
two releases can run side by side during a deploy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

__all__ = ["LuaScript"]


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script from package data, with the SHA1 that EVALSHA names it by."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> LuaScript:
        """Read ``lua/<name>`` from the package."""
        source = resources.files("proxy.store").joinpath(f"lua/{name}").read_text("utf-8")
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())
