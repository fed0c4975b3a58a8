"""Builds the aiohttp application. Shared resources (client session, store, ledger
writer, catalog, token counter) live in ``web.AppKey`` slots and are opened and closed
by ``cleanup_ctx``, never held in module globals."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.admin import setup_admin
from proxy.budget_gate import BudgetGate
from proxy.budget_specs import SpecWatcher
from proxy.callers import KeyRing
from proxy.journal import Journal
from proxy.ledger import LedgerWriter
from proxy.metrics import Metrics
from proxy.pipeline import Pipeline
from proxy.pricing import Catalog
from proxy.settings import Settings, journal_dir_for, tiktoken_dir_from_env
from proxy.store import open_store
from proxy.store.base import Store
from proxy.tokens import TokenCounter
from proxy.upstream import make_session

log = logging.getLogger("metergate")

SETTINGS = web.AppKey("settings", Settings)
CATALOG = web.AppKey("catalog", Catalog)
METRICS = web.AppKey("metrics", Metrics)


@dataclass(slots=True)
class Running:
    """What exists only while the app runs (filled in by ``cleanup_ctx``)."""

    store: Store | None = None
    pipeline: Pipeline | None = None
    gate: BudgetGate | None = None


RUNNING = web.AppKey("running", Running)


def build_app(settings: Settings, *, registry: CollectorRegistry | None = None) -> web.Application:
    """The proxy application for ``settings``. The price catalog is loaded here, so a
    broken catalog fails at start-up rather than on the first request."""
    catalog = Catalog.load(settings.prices)
    app = web.Application(
        # aiohttp's own default is 1 MiB; our limit is enforced (with a provider-shaped
        # 413) in the pipeline, so aiohttp must let bodies up to it through.
        client_max_size=settings.server.max_body_bytes,
        handler_args={"max_field_size": 16384, "max_headers": 128},
    )
    app[SETTINGS] = settings
    app[CATALOG] = catalog
    app[METRICS] = Metrics(registry or CollectorRegistry(), known_models=catalog.models())
    app[RUNNING] = Running()
    app.cleanup_ctx.append(_resources)
    app.cleanup_ctx.append(app[METRICS].loop_lag_ctx)  # metergate_event_loop_lag_seconds
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    running = app[RUNNING]
    setup_admin(
        app,
        token=settings.admin_token,
        get_gate=lambda: running.gate,
        # None while starting or stopping, so the admin API answers 503 rather than
        # touching a store that is not open.
        get_store=lambda: running.store if running.pipeline is not None else None,
        config_specs=settings.budgets,
    )
    app.router.add_route("*", "/{upstream}/{path:.*}", _proxy)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    vocab = tiktoken_dir_from_env(settings)
    counter = TokenCounter(vocab_dir=Path(vocab) if vocab else None)
    # Loading a vocabulary takes about a second: do it now, off the loop, not on the
    # first request that needs an estimate.
    await counter.preload_async()
    store = open_store(settings.store)
    await store.open()
    writer = LedgerWriter(store)
    await writer.start()
    # Charges and records the store could not take (fail_open) wait in the journal and
    # are replayed, exactly once, as soon as the store answers again.
    journal_dir = journal_dir_for(settings)
    journal = Journal(journal_dir) if journal_dir else None
    replay: asyncio.Task[None] | None = None
    if journal is not None:
        await journal.open()
        replay = asyncio.get_running_loop().create_task(journal.run_replay(store))
    gate = BudgetGate(
        store,
        settings.budgets,
        journal=journal,
        on_store_error=settings.on_store_error,
        store_timeout_s=settings.store_timeout_ms / 1000.0,
        reservation_ttl_s=settings.reservation_ttl_s,
    )
    session = make_session(settings.upstreams)
    pipeline = Pipeline(
        settings=settings,
        keyring=KeyRing(settings.keys, passthrough=settings.passthrough_keys),
        catalog=app[CATALOG],
        counter=counter,
        writer=writer,
        metrics=app[METRICS],
        session=session,
        gate=gate,
        journal=journal,
    )
    # Budgets can be added at run time (CLI, admin API), so the gate always exists; the
    # watcher puts run-time changes in force on every replica within a second.
    watcher = SpecWatcher(store, gate, settings.budgets)
    await watcher.start()
    running = app[RUNNING]
    running.store, running.gate, running.pipeline = store, gate, pipeline
    # Everything loaded so far (catalog, vocabularies, modules) lives as long as the
    # process: moving it out of the collector's generations avoids full collections
    # that would pause the loop for tens of milliseconds.
    gc.collect()
    gc.freeze()
    log.info(
        "metergate ready: store %s, upstreams %s",
        settings.store.split("://", 1)[0],
        ", ".join(f"{u.name}={u.url}" for u in settings.upstreams.values()),
    )
    try:
        yield
    finally:
        running.pipeline = running.gate = None
        await watcher.stop()
        await pipeline.drain()
        await gate.drain()
        await writer.close()
        if replay is not None:
            replay.cancel()
            await asyncio.gather(replay, return_exceptions=True)
        if journal is not None:
            await journal.close()
        await session.close()
        await store.close()
        counter.close()


async def _proxy(request: web.Request) -> web.StreamResponse:
    pipeline = request.app[RUNNING].pipeline
    if pipeline is None:
        raise web.HTTPServiceUnavailable(text="Metergate is shutting down.")
    return await pipeline.handle(request)


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    # Budget gauges come from the shared store, read now (bounded by a timeout).
    await metrics.refresh_budgets(request.app[RUNNING].gate)
    body = generate_latest(metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready = request.app[RUNNING].pipeline is not None
    return web.json_response(
        {"status": "ready" if ready else "starting"}, status=200 if ready else 503
    )
