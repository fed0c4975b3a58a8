"""Issued keys on Redis: the key half of :class:`~proxy.store.redis.RedisStore`.

Key layout (the namespace's hash tag ``{ns}``, the same slot as the budgets)::

    {ns}:keys        HASH    key id -> JSON document (a salted digest, never the key)
    {ns}:keys:rev    HASH    key id -> revision
    {ns}:keys:names  HASH    name -> key id, for active keys
    {ns}:keys:v      STRING  version, bumped by every change (absent = 0)

Writes and the full read are one ``keys_v1.lua`` call each (see its header); replicas
poll the version with one ``GET`` and read the table only when it moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from proxy.store.keys_common import decode_key_docs, encode_key_doc
from proxy.store.redis_scripts import LuaScript, RedisPlumbing, text

__all__ = ["RedisKeyMethods"]

_KEYS: Final = LuaScript.load("keys_v1.lua")


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    """A flat ``[field, value, ...]`` script reply as pairs."""
    flat = list(reply or [])
    return list(zip(flat[::2], flat[1::2], strict=True))


class RedisKeyMethods(RedisPlumbing):
    """Implements the issued-key methods of :class:`~proxy.store.base.Store` for
    :class:`~proxy.store.redis.RedisStore`, which provides the plumbing below."""

    def _key_keys(self) -> tuple[str, str, str, str]:
        tag = self._tag
        return f"{tag}:keys", f"{tag}:keys:rev", f"{tag}:keys:names", f"{tag}:keys:v"

    async def create_api_key(self, key_id: str, doc: Mapping[str, Any]) -> bool:
        """See :meth:`Store.create_api_key`; one ``keys_v1.lua`` call."""
        name, text = encode_key_doc(key_id, doc)
        reply = int(await self._eval(_KEYS, self._key_keys(), ["create", key_id, name, text]))
        if reply == -2:
            raise ValueError(f"The key id {key_id!r} is already stored.")
        return reply > 0

    async def update_api_key(
        self, key_id: str, doc: Mapping[str, Any], *, rev: int, active: bool
    ) -> bool:
        """See :meth:`Store.update_api_key`; one ``keys_v1.lua`` call."""
        name, text = encode_key_doc(key_id, doc)
        args = ["update", key_id, name, text, int(rev), "1" if active else "0"]
        return int(await self._eval(_KEYS, self._key_keys(), args)) > 0

    async def api_keys(self) -> dict[str, dict[str, Any]]:
        """See :meth:`Store.api_keys`; one ``keys_v1.lua`` call reading documents and
        revisions together."""
        docs, revs = await self._eval(_KEYS, self._key_keys(), ["read"])
        rev_of = {text(i): int(r) for i, r in _pairs(revs)}
        return decode_key_docs(
            (text(i), doc, rev_of[text(i)]) for i, doc in _pairs(docs) if text(i) in rev_of
        )

    async def api_keys_version(self) -> int:
        """See :meth:`Store.api_keys_version`; one ``GET``."""
        raw = await self._command("GET", self._key_keys()[3])
        return 0 if raw is None else int(raw)
