"""Run-time budget specs on Redis: the spec half of :class:`~proxy.store.redis.RedisStore`.

Key layout (the namespace's hash tag ``{ns}``, the same slot as the budgets)::

    {ns}:specs    HASH    budget name -> JSON document
    {ns}:specs:v  STRING  version, bumped by every change (absent = 0)

Writes are one ``specs_v1.lua`` call each (document and version change together);
replicas poll the version with one ``GET`` and read the hash only when it moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from proxy.store.base import decode_spec_docs, encode_spec_doc
from proxy.store.redis_scripts import LuaScript, RedisPlumbing

__all__ = ["RedisSpecMethods"]

_SPECS: Final = LuaScript.load("specs_v1.lua")


class RedisSpecMethods(RedisPlumbing):
    """Implements the run-time spec methods of :class:`~proxy.store.base.Store` for
    :class:`~proxy.store.redis.RedisStore`, which provides the plumbing below."""

    def _spec_keys(self) -> tuple[str, str]:
        tag = self._tag
        return f"{tag}:specs", f"{tag}:specs:v"

    async def put_budget_spec(self, name: str, doc: Mapping[str, Any]) -> None:
        """See :meth:`Store.put_budget_spec`; one ``specs_v1.lua`` call."""
        text = encode_spec_doc(name, doc)
        await self._eval(_SPECS, self._spec_keys(), ["put", name, text])

    async def delete_budget_spec(self, name: str) -> bool:
        """See :meth:`Store.delete_budget_spec`; one ``specs_v1.lua`` call."""
        if not name:
            raise ValueError("A budget spec needs a non-empty name.")
        return int(await self._eval(_SPECS, self._spec_keys(), ["delete", name])) != 0

    async def budget_specs(self) -> dict[str, dict[str, Any]]:
        """See :meth:`Store.budget_specs`; one ``HGETALL``."""
        reply = await self._command("HGETALL", self._spec_keys()[0])
        if isinstance(reply, dict):
            return decode_spec_docs(reply.items())
        pairs = list(reply or [])  # a flat [name, doc, ...] list without a reply callback
        return decode_spec_docs(zip(pairs[::2], pairs[1::2], strict=True))

    async def budget_specs_version(self) -> int:
        """See :meth:`Store.budget_specs_version`; one ``GET``."""
        raw = await self._command("GET", self._spec_keys()[1])
        return 0 if raw is None else int(raw)
