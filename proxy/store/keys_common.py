"""Issued Metergate keys in a store: the helpers every backend shares.

The store keeps one JSON document per issued key, by key id, in the shape written by
:meth:`proxy.keys.IssuedKey.to_doc` (name, team, user, the key's salted digest, its
dates...; never the key itself). The store does not interpret the documents beyond
two fields it needs to be atomic about:

- ``name``: unique among *active* keys (not yet revoked). :meth:`Store.create_api_key`
  refuses a name an active key holds, in the same atomic step as the write, so two
  administrators issuing ``app-a`` at once cannot both succeed.
- the *revision*, kept by the store beside the document (1 at creation, +1 on every
  update): :meth:`Store.update_api_key` is a compare-and-set on it, so a rotation and
  a revocation racing each other cannot silently undo one another.

A *version* counts every change, as for run-time budget specs: replicas poll it (one
cheap read) and reload the documents only when it moved (see
:class:`proxy.key_watcher.IssuedKeys`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

__all__ = ["REV_FIELD", "decode_key_docs", "encode_key_doc"]

log = logging.getLogger("metergate.store")

REV_FIELD = "rev"
"""The member :meth:`Store.api_keys` adds to each document: the store's revision."""


def encode_key_doc(key_id: str, doc: Mapping[str, Any]) -> tuple[str, str]:
    """``(name, JSON text)`` of a key document, refusing what no backend could keep:
    an empty id, a document without a non-empty ``name``, one that is not JSON. A
    ``rev`` member is dropped (the store keeps the revision itself)."""
    if not isinstance(key_id, str) or not key_id:
        raise ValueError("An issued key needs a non-empty id.")
    if not isinstance(doc, Mapping):
        raise TypeError(f"The document of key {key_id!r} must be a mapping.")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"The document of key {key_id!r} needs a non-empty 'name'.")
    body = {k: v for k, v in doc.items() if k != REV_FIELD}
    try:
        return name, orjson.dumps(body).decode()
    except TypeError as exc:
        raise ValueError(
            f"The document of key {key_id!r} cannot be stored as JSON: {exc}."
        ) from None


def decode_key_docs(
    rows: Iterable[tuple[str | bytes, str | bytes, int | str | bytes]],
) -> dict[str, dict[str, Any]]:
    """Stored ``(id, JSON text, revision)`` rows as documents with ``rev`` set. A
    document that is not a JSON object (written around Metergate) is logged and left
    out, so that one bad entry cannot take every other key down with it."""
    docs: dict[str, dict[str, Any]] = {}
    for raw_id, raw_doc, raw_rev in rows:
        key_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
        try:
            doc = orjson.loads(raw_doc)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            log.warning(
                "the stored document of key id %r is not a JSON object; ignoring it", key_id
            )
            continue
        doc[REV_FIELD] = int(raw_rev)
        docs[key_id] = doc
    return docs
