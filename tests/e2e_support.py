"""Helpers shared by the end-to-end tests (SDK matrix, transparency, bad input,
disconnects, reconciliation, event-loop lag).

They tie three views of one request together: what the fake upstream says it sent
(``fake.records``, keyed by the ``x-request-id`` / ``request-id`` it answered with),
what the proxy wrote to its ledger (``record.extra["upstream_request_id"]``), and what
that usage costs at the catalog price, computed here independently of the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from proxy.app import CATALOG
from proxy.ledger import LedgerRecord
from proxy.pricing import Price, cost_nanos
from proxy.usage import Usage
from tests.conftest import RunningProxy, base_config, deep_merge, start_proxy
from tests.fake_upstream import FakeUpstream

Json = dict[str, Any]

#: Keys whose values the fake draws fresh for every response (ids and clocks).
VARYING_KEYS = frozenset({"id", "item_id", "created", "created_at", "completed_at", "request_id"})
_VARYING_BYTES = re.compile(
    rb'"(?:id|item_id|request_id)":\s*"[^"]*"|"(?:created|created_at|completed_at)":\s*\d+'
)


def scrub(value: Any) -> Any:
    """``value`` (a parsed JSON / ``model_dump`` tree) with per-call ids and clocks
    replaced by ``"*"``, so two answers to the same request compare equal."""
    if isinstance(value, dict):
        return {k: "*" if k in VARYING_KEYS else scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def scrub_bytes(raw: bytes) -> bytes:
    """Raw JSON/SSE bytes with per-call ids and clocks masked, every other byte kept."""

    def mask(m: re.Match[bytes]) -> bytes:
        text = m.group(0)
        key, _, _ = text.partition(b":")
        return key + b':"*"'

    return _VARYING_BYTES.sub(mask, raw)


def fake_usage(record: Json) -> Usage:
    """The usage a complete response reported, as :class:`Usage` (from the fake's
    normalised ``tokens``)."""
    t = record["tokens"]
    return Usage(
        input=t["input"],
        output=t["output"] if t["output"] is not None else 0,
        cached_input=t["cached_input"],
        cache_write=t["cache_write"],
        cache_write_1h=t["cache_write_1h"],
        reasoning=t["reasoning"],
    )


def catalog_price(proxy: RunningProxy, record: Json) -> Price:
    """The price the request should be charged at: the served snapshot's own entry when
    it has one, else the requested model's."""
    catalog = proxy.app[CATALOG]
    price = catalog.resolve(record["model"]) or catalog.resolve(record["request_model"])
    assert price is not None, f"no catalog price for {record['model']!r}"
    return price


def expected_cost(proxy: RunningProxy, record: Json) -> int:
    """``cost_nanos(catalog price, reported usage)`` for one fake record."""
    return cost_nanos(catalog_price(proxy, record), fake_usage(record))


def assert_tokens_equal(led: LedgerRecord, record: Json) -> None:
    """The ledger's token counts are exactly what the fake reported, kind by kind."""
    t = record["tokens"]
    got = {
        "input": led.input_tokens,
        "cached_input": led.cached_input_tokens,
        "cache_write": led.cache_write_tokens,
        "output": led.output_tokens,
        "reasoning": led.reasoning_tokens,
    }
    want = {k: t[k] or 0 for k in got}
    assert got == want, f"ledger {got} != fake {want} for {record['request_id']}"


async def ledger_by_upstream_id(proxy: RunningProxy) -> dict[str, list[LedgerRecord]]:
    """Every ledger record, grouped by the upstream request id it carries."""
    out: dict[str, list[LedgerRecord]] = {}
    for led in await proxy.store.ledger_records():
        uid = led.extra.get("upstream_request_id")
        if uid:
            out.setdefault(uid, []).append(led)
    return out


async def ledger_for(proxy: RunningProxy, upstream_request_id: str) -> LedgerRecord:
    """The one ledger record of the upstream request ``upstream_request_id``."""
    found = (await ledger_by_upstream_id(proxy)).get(upstream_request_id, [])
    assert len(found) == 1, f"{len(found)} ledger records for {upstream_request_id}"
    return found[0]


async def wait_for(predicate: Any, *, within: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate()`` (sync or async) until it is truthy, for at most ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def metric_sum(proxy: RunningProxy, sample_name: str, **labels: str) -> float:
    """The sum of every sample called ``sample_name`` whose labels include ``labels``
    (e.g. a counter over all models and teams)."""
    total = 0.0
    for family in proxy.registry.collect():
        for sample in family.samples:
            if sample.name == sample_name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


async def raw_post(
    url: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    *,
    session: aiohttp.ClientSession | None = None,
) -> tuple[int, Any, bytes]:
    """POST raw bytes with a plain aiohttp client (no decompression); returns status,
    headers and the body bytes exactly as received."""
    own = session is None
    s = session or aiohttp.ClientSession(auto_decompress=False)
    try:
        async with s.post(url, data=body, headers=headers or {}) as resp:
            return resp.status, resp.headers, await resp.read()
    finally:
        if own:
            await s.close()


@contextlib.asynccontextmanager
async def fake_and_proxy(
    tmp_dir: Path,
    overrides: dict[str, Any] | None = None,
    *,
    store: str | None = None,
    **fake_kw: Any,
) -> AsyncIterator[tuple[FakeUpstream, RunningProxy]]:
    """A fake upstream and a proxy in front of it, for module-scoped fixtures (a proxy
    takes about half a second to start: it loads two tiktoken vocabularies)."""
    async with FakeUpstream(**fake_kw) as fake:
        config = deep_merge(
            base_config(fake.url, store or f"sqlite:///{tmp_dir}/ledger.db"), overrides or {}
        )
        proxy, runner = await start_proxy(config)
        try:
            yield fake, proxy
        finally:
            await runner.cleanup()
