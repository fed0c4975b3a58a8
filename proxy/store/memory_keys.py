"""Issued keys in the memory store: dicts, one synchronous section per call.

Like the rest of :class:`~proxy.store.memory.MemoryStore`, each method runs without
awaiting anything, so it is atomic with respect to the event loop, and nothing is
shared between processes (issuing keys at run time needs SQLite or Redis).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.store.base import Store
from proxy.store.keys_common import decode_key_docs, encode_key_doc

__all__ = ["MemoryKeyMethods", "MemoryKeyTable"]


@dataclass(slots=True)
class MemoryKeyTable:
    """Documents (id -> JSON text, as the other backends keep them), revisions, the
    active-name index and the version."""

    docs: dict[str, str] = field(default_factory=dict)
    revs: dict[str, int] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # active name -> id
    version: int = 0


class MemoryKeyMethods(Store):
    """Implements the issued-key methods of :class:`~proxy.store.base.Store` for the
    memory store, which provides ``_keys`` (a :class:`MemoryKeyTable`) and
    ``_check_open``."""

    _keys: MemoryKeyTable

    @abstractmethod
    def _check_open(self) -> None:
        """Raise when the store is closed (provided by the store)."""

    async def create_api_key(self, key_id: str, doc: Mapping[str, Any]) -> bool:
        """See :meth:`Store.create_api_key`."""
        self._check_open()
        name, text = encode_key_doc(key_id, doc)
        table = self._keys
        if key_id in table.docs:
            raise ValueError(f"The key id {key_id!r} is already stored.")
        if name in table.names:
            return False
        table.docs[key_id], table.revs[key_id], table.names[name] = text, 1, key_id
        table.version += 1
        return True

    async def update_api_key(
        self, key_id: str, doc: Mapping[str, Any], *, rev: int, active: bool
    ) -> bool:
        """See :meth:`Store.update_api_key`."""
        self._check_open()
        name, text = encode_key_doc(key_id, doc)
        table = self._keys
        if table.revs.get(key_id) != rev:
            return False
        table.docs[key_id], table.revs[key_id] = text, rev + 1
        if not active and table.names.get(name) == key_id:
            del table.names[name]
        table.version += 1
        return True

    async def api_keys(self) -> dict[str, dict[str, Any]]:
        """See :meth:`Store.api_keys`."""
        self._check_open()
        table = self._keys
        return decode_key_docs((i, text, table.revs[i]) for i, text in table.docs.items())

    async def api_keys_version(self) -> int:
        """See :meth:`Store.api_keys_version`."""
        self._check_open()
        return self._keys.version
