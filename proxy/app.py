"""Builds the aiohttp application. Shared resources (upstream client, store, ledger
writer, catalog, token counter) live in ``web.AppKey`` slots and are opened and closed
by ``cleanup_ctx``, never held in module globals."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from proxy.admin import setup_admin
from proxy.admin_keys import KeyRoutes
from proxy.alerts import AlertService
from proxy.budget_gate import BudgetGate, wait_for_store
from proxy.budget_specs import SpecWatcher
from proxy.callers import KeyRing
from proxy.errors import NotFound, StoreUnavailable
from proxy.journal import Journal
from proxy.key_ops import KeyConfig
from proxy.key_watcher import IssuedKeys
from proxy.ledger import LedgerWriter
from proxy.ledger_spool import spool_for
from proxy.metrics import Metrics
from proxy.pipeline import Pipeline
from proxy.pricing import Catalog
from proxy.settings import Settings, journal_dir_for, tiktoken_dir_from_env
from proxy.store import open_store
from proxy.store.base import Store
from proxy.token_process import ProcessTokenCounter
from proxy.upstream import make_client

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
    keys: IssuedKeys | None = None
    #: ``http://host:port`` of the admin listener once it listens (``server.admin_port``).
    admin_url: str | None = None


RUNNING = web.AppKey("running", Running)
#: How long ``/readyz`` waits for the store before calling it unreachable.
READY_STORE_TIMEOUT_S = 1.0


def build_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    multiprocess_dir: str | None = None,
    reuse_port: bool = False,
) -> web.Application:
    """The proxy application for ``settings``. The price catalog is loaded here, so a
    broken catalog fails at start-up rather than on the first request.
    ``multiprocess_dir``: set by ``serve --workers`` (see :mod:`proxy.workers`), which
    also sets ``reuse_port`` for the admin listener.

    With ``server.admin_port`` set, ``/admin``, ``/ui`` and ``/metrics`` are served by a
    second application on that port only (so the proxy port can face apps while the
    admin port stays on an internal network); it shares this app's resources and is
    opened and closed by this app's ``cleanup_ctx``. ``/healthz`` and ``/readyz`` are
    served on both."""
    catalog = Catalog.load(settings.prices)
    app = web.Application(
        # aiohttp's own default is 1 MiB; our limit is enforced (with a provider-shaped
        # 413) in the pipeline, so aiohttp must let bodies up to it through.
        client_max_size=settings.server.max_body_bytes,
        handler_args={"max_field_size": 16384, "max_headers": 128},
    )
    app[SETTINGS] = settings
    app[CATALOG] = catalog
    app[METRICS] = Metrics(
        registry or CollectorRegistry(),
        known_models=catalog.models(),
        labels=settings.metrics.labels,
        max_label_values=settings.metrics.max_label_values,
        multiprocess_dir=multiprocess_dir,
    )
    app[RUNNING] = Running()
    app.cleanup_ctx.append(_resources)
    app.cleanup_ctx.append(app[METRICS].loop_lag_ctx)  # metergate_event_loop_lag_seconds
    ops = app
    if settings.server.admin_port is not None:
        ops = web.Application(handler_args={"max_field_size": 16384, "max_headers": 128})
        ops[SETTINGS], ops[CATALOG] = app[SETTINGS], app[CATALOG]
        ops[METRICS], ops[RUNNING] = app[METRICS], app[RUNNING]
        app.cleanup_ctx.append(functools.partial(_admin_listener, ops, reuse_port=reuse_port))
    for served in {id(app): app, id(ops): ops}.values():
        served.router.add_get("/healthz", _healthz)
        served.router.add_get("/readyz", _readyz)
    ops.router.add_get("/metrics", _metrics)
    running = app[RUNNING]
    setup_admin(
        ops,
        token=settings.admin_token,
        get_gate=lambda: running.gate,
        # None while starting or stopping, so the admin API answers 503 rather than
        # touching a store that is not open.
        get_store=lambda: running.store if running.pipeline is not None else None,
        config_specs=settings.budgets,
        keys=KeyRoutes(KeyConfig.from_settings(settings), get_keys=lambda: running.keys),
    )
    app.router.add_route("*", "/{upstream}/{path:.*}", _proxy)
    # Anything else ("/", "/openai" with no path, "//host/...") gets a JSON error an SDK
    # can parse rather than aiohttp's plain-text 404.
    app.router.add_route("*", "/{tail:.*}", _no_route)
    if ops is not app:
        ops.router.add_route("*", "/{tail:.*}", _no_route)
    return app


async def _admin_listener(
    ops: web.Application, app: web.Application, *, reuse_port: bool
) -> AsyncIterator[None]:
    """Serve ``ops`` (/admin, /ui, /metrics) on ``server.admin_port`` while ``app`` runs:
    opened after the resources are ready, closed before they are."""
    server = app[SETTINGS].server
    runner = web.AppRunner(ops, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    host = server.admin_host or server.host
    site = web.TCPSite(runner, host, server.admin_port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    app[RUNNING].admin_url = f"http://{bound_host}:{bound_port}"
    log.info("admin, /ui and /metrics listening on %s", app[RUNNING].admin_url)
    try:
        yield
    finally:
        app[RUNNING].admin_url = None
        await runner.cleanup()


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    vocab = tiktoken_dir_from_env(settings)
    # Tokens are counted in a child process started on the first count: building a
    # vocabulary would hold this process's GIL (and stall the loop) for ~140 ms, and
    # most processes never count, as providers report usage (see proxy.token_process).
    # The vocabulary files are checked now, so a missing one still fails at start-up.
    counter = ProcessTokenCounter(vocab_dir=Path(vocab) if vocab else None)
    await asyncio.get_running_loop().run_in_executor(None, counter.check_available)
    store = open_store(settings.store)
    await store.open()
    # Keys issued at run time: each replica's copy of the store's key table. Refuses to
    # start (ConfigError) when the store holds keys this config's key_secret cannot read.
    keys = IssuedKeys(store, settings.key_secret)
    try:
        await keys.start()
    except BaseException:
        await store.close()
        raise
    # The SQLite store's records are durable once in its spool file (one write per loop
    # iteration), so responses do not wait for a commit on the store's thread. Records
    # a crashed process left in its spool were stored by store.open(); those of a
    # sibling worker that crashes later are, within seconds, by spool.run_replay.
    spool = spool_for(store)
    spool_replay: asyncio.Task[None] | None = None
    if spool is not None:
        await asyncio.get_running_loop().run_in_executor(None, spool.open)
        spool_replay = asyncio.get_running_loop().create_task(spool.run_replay(store))
    writer = LedgerWriter(
        store,
        spool=spool,
        bound=lambda call: wait_for_store(
            call,
            settings.store_timeout_ms / 1000.0,
            answers=lambda: writer.batches + writer.failed_batches,
        ),
    )
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
    client = make_client(settings.upstreams)
    pipeline = Pipeline(
        settings=settings,
        keyring=KeyRing(settings.keys, passthrough=settings.passthrough_keys, issued=keys),
        catalog=app[CATALOG],
        counter=counter,
        writer=writer,
        metrics=app[METRICS],
        client=client,
        gate=gate,
        journal=journal,
    )
    # Budgets can be added at run time (CLI, admin API), so the gate always exists; the
    # watcher puts run-time changes in force on every replica within a second.
    watcher = SpecWatcher(store, gate, settings.budgets)
    await watcher.start()
    # Budget alerts: evaluated and delivered in background tasks, off the request path.
    alerts = None
    if settings.alerts is not None:
        alerts = AlertService(settings.alerts, store, gate, app[METRICS])
        await alerts.start()
    running = app[RUNNING]
    running.store, running.gate, running.pipeline = store, gate, pipeline
    running.keys = keys
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
        running.pipeline = running.gate = running.keys = None
        await watcher.stop()
        await keys.stop()
        if alerts is not None:
            await alerts.stop()
        await pipeline.drain()
        await gate.drain()
        await writer.close()
        for task in (replay, spool_replay):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if spool is not None:
            spool.close()
        if journal is not None:
            await journal.close()
        await client.close()
        await store.close()
        await asyncio.get_running_loop().run_in_executor(None, counter.close)


async def _proxy(request: web.Request) -> web.StreamResponse:
    pipeline = request.app[RUNNING].pipeline
    if pipeline is None:
        raise web.HTTPServiceUnavailable(text="Metergate is shutting down.")
    return await pipeline.handle(request)


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    # Budget gauges come from the shared store, read now (bounded by a timeout).
    await metrics.refresh_budgets(request.app[RUNNING].gate)
    body = metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _no_route(request: web.Request) -> web.Response:
    err = NotFound(
        "This path is not served by Metergate. Send API calls to /<upstream>/<path>, e.g. "
        "base_url http://HOST:PORT/openai/v1 for the OpenAI SDK or "
        "http://HOST:PORT/anthropic for the Anthropic SDK."
    )
    return web.Response(
        status=err.status, body=err.render("openai"), content_type="application/json"
    )


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    """Ready when started and the store answers. A store that does not answer makes the
    replica unready (503) only under ``fail_closed``, where every budgeted request would
    be refused anyway; under ``fail_open`` it keeps serving (``degraded``), and taking
    every replica out of a load balancer because Redis is down would turn a store
    outage into a full one."""
    running = request.app[RUNNING]
    store = running.store
    if running.pipeline is None or store is None:
        return web.json_response({"status": "starting"}, status=503)
    try:
        async with asyncio.timeout(READY_STORE_TIMEOUT_S):
            await store.budget_specs_version()  # one cheap read (a GET on Redis)
        reachable = True
    except (StoreUnavailable, TimeoutError):
        reachable = False
    policy = request.app[SETTINGS].on_store_error
    if reachable:
        status, code = "ready", 200
    elif policy == "fail_open":
        status, code = "degraded", 200
    else:
        status, code = "unavailable", 503
    body = {"status": status, "store": "ok" if reachable else "unreachable", "policy": policy}
    return web.json_response(body, status=code)
