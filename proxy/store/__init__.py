"""Storage backends, chosen by URL.

::

    store = open_store("sqlite:///var/metergate/ledger.db")
    await store.open()

Built in: ``memory://`` (tests, throwaway runs), ``sqlite:///path`` (the embedded
default; ``sqlite:////abs/path`` for an absolute path), and Redis shared by replicas:
``redis://``, ``rediss://`` (TLS), ``redis+cluster://`` and ``rediss+cluster://`` (Redis
Cluster; see :mod:`proxy.store.redis`). Other backends plug in with
:func:`register_store`.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.store.aggregate import GROUP_COLUMNS, NONE_LABEL, ReportRow, aggregate
from proxy.store.base import BudgetState, RateItem, ReserveItem, ReserveResult, Store
from proxy.store.memory import MemoryStore
from proxy.store.redis import SCHEMES as REDIS_SCHEMES
from proxy.store.redis import RedisStore
from proxy.store.sqlite import SqliteStore

__all__ = [
    "GROUP_COLUMNS",
    "NONE_LABEL",
    "BudgetState",
    "MemoryStore",
    "RateItem",
    "RedisStore",
    "ReportRow",
    "ReserveItem",
    "ReserveResult",
    "SqliteStore",
    "Store",
    "StoreFactory",
    "aggregate",
    "known_schemes",
    "open_store",
    "register_store",
]

StoreFactory = Callable[[str], Store]
"""Builds an unopened store from its full URL (the factory parses what it needs)."""

_REGISTRY: dict[str, StoreFactory] = {}


def register_store(scheme: str, factory: StoreFactory, *, replace: bool = False) -> None:
    """Make ``open_store`` build ``factory(url)`` for URLs starting ``scheme://``.

    Registering a scheme twice is refused unless ``replace`` is True, so that two
    backends cannot silently fight over one scheme.
    """
    key = scheme.lower()
    if not replace and key in _REGISTRY and _REGISTRY[key] is not factory:
        raise ValueError(f"A store backend is already registered for {key}://.")
    _REGISTRY[key] = factory


def known_schemes() -> tuple[str, ...]:
    """The URL schemes that currently have a backend, sorted."""
    return tuple(sorted(_REGISTRY))


def open_store(url: str) -> Store:
    """Build the store a URL names. The caller must ``await store.open()`` before use.

    Raises ValueError for a URL without a scheme or with a scheme no backend handles.
    """
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise ValueError(
            "The store URL has no scheme; write it like 'sqlite:///metergate.db' or 'memory://'."
        )
    factory = _REGISTRY.get(scheme.lower())
    if factory is None:
        raise ValueError(
            # The URL itself is not echoed: it may carry a password.
            f"No store backend handles {scheme}:// URLs. "
            f"Known schemes: {', '.join(s + '://' for s in known_schemes())}."
        )
    return factory(url)


register_store("memory", MemoryStore.from_url)
register_store("sqlite", SqliteStore.from_url)
for _scheme in REDIS_SCHEMES:
    register_store(_scheme, RedisStore.from_url)
