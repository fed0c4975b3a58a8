"""The request pipeline: the only place that knows the order of the steps.

    identify caller → read and parse the request → check the price → forward →
    relay (body, or stream chunk by chunk while metering) → price actual usage →
    write the ledger record → release the end of the response → metrics and log

Durability rule: the ledger record is written (durably, through the group-committing
:class:`~proxy.ledger.LedgerWriter`) *before* the client receives the end of its
response: the whole body of a non-streamed response, the terminator event of a stream.
So a client that saw a complete response is always in the ledger, even after a
``kill -9``. Streams whose end the client never sees (disconnects, upstream breaks)
are recorded as soon as the proxy knows, with estimated usage.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from proxy.access_log import log_line
from proxy.budget import RequestFacts, Reservation, worst_case_nanos
from proxy.budget_gate import BudgetGate
from proxy.callers import Caller, KeyRing, parse_tags
from proxy.errors import (
    BadRequest,
    MetergateError,
    NotFound,
    PayloadTooLarge,
    UnknownModelPrice,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.journal import Journal
from proxy.ledger import LedgerRecord, LedgerWriter
from proxy.metrics import Metrics, status_class
from proxy.pricing import Catalog, Price, cost_nanos
from proxy.providers import PROVIDERS, ParsedRequest, Provider, StreamMeter
from proxy.report import nanos_to_usd_str
from proxy.settings import Settings, UpstreamSettings
from proxy.tokens import PromptCounter, encoding_name_for_model
from proxy.upstream import (
    Decoder,
    client_response_headers,
    decode_body,
    decoder_for,
    request_timeouts,
    upstream_request_headers,
)
from proxy.upstream_client import (
    Origin,
    UpstreamClient,
    UpstreamClientError,
    UpstreamConnectError,
    UpstreamResponse,
)
from proxy.usage import Usage

log = logging.getLogger("metergate")
access_log = logging.getLogger("metergate.access")

REQUEST_ID_HEADER = "X-Metergate-Request-Id"
COST_HEADER = "X-Metergate-Cost-USD"
#: Bodies above this many bytes have their prompt text extracted off the event loop.
INLINE_PARSE_LIMIT = 64 * 1024
#: Up to this body size, reservations use the byte count as the input-token bound.
BYTES_BOUND_LIMIT = 2048
#: Margins on a counted prompt: framing and tool schemas the text leaves out, and the
#: difference between cl100k_base and Claude's unpublished tokenizer.
EXACT_MARGIN = 1.1
APPROXIMATE_MARGIN = 1.5
BOUND_SLACK_TOKENS = 64
#: Output tokens to reserve for when neither the request nor the catalog gives a limit.
DEFAULT_OUTPUT_BOUND = 32_768
#: How often a stream checks that its client is still connected (seconds).
CLIENT_CHECK_INTERVAL_S = 0.5
_NOT_METERED = ParsedRequest(
    endpoint="other",
    metered=False,
    model=None,
    stream=False,
    max_output_tokens=None,
    end_user=None,
    body=b"",
)


@dataclass(slots=True)
class Exchange:
    """Everything one request accumulates on its way through the pipeline."""

    request_id: str
    ts_ms: int
    t0: float
    upstream: UpstreamSettings
    provider: Provider
    caller: Caller | None = None
    tags: tuple[str, ...] = ()
    parsed: ParsedRequest = _NOT_METERED
    price: Price | None = None
    status: int = 0
    usage: Usage | None = None
    served_model: str | None = None
    cost_nanos: int = 0
    error: str | None = None
    recorded: bool = False
    meter: StreamMeter | None = None
    raw_path: str = ""
    sent: bool = False
    upstream_status: int = 0
    reservation: Reservation | None = None
    upstream_wait: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)


class Pipeline:
    """Handles every proxied request; one instance per application."""

    def __init__(
        self,
        *,
        settings: Settings,
        keyring: KeyRing,
        catalog: Catalog,
        counter: PromptCounter,
        writer: LedgerWriter,
        metrics: Metrics,
        client: UpstreamClient,
        gate: BudgetGate | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.settings = settings
        self.keyring = keyring
        self.catalog = catalog
        self.counter = counter
        self.writer = writer
        self.metrics = metrics
        self.client = client
        self.gate = gate
        self._timeouts = {name: request_timeouts(u) for name, u in settings.upstreams.items()}
        self._origins = {name: Origin.of(u.url) for name, u in settings.upstreams.items()}
        self.journal = journal
        self.fallback = (
            Catalog.fallback(dict(settings.fallback_price))
            if settings.unknown_model == "charge_fallback" and settings.fallback_price
            else None
        )
        self._background: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------- entry point
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Proxy one request to the upstream named by the first path segment."""
        t0 = time.perf_counter()
        upstream = self.settings.upstreams.get(request.match_info["upstream"])
        if upstream is None:
            names = ", ".join(sorted(self.settings.upstreams))
            err = NotFound(
                f"There is no upstream named {request.match_info['upstream']!r} on this proxy; "
                f"the configured upstreams are: {names}. Point your SDK's base_url at "
                f"/<upstream>/..."
            )
            return _error_response(err, "openai", _new_request_id())
        ex = Exchange(
            request_id=_new_request_id(),
            ts_ms=time.time_ns() // 1_000_000,
            t0=t0,
            upstream=upstream,
            provider=PROVIDERS[upstream.format],
        )
        try:
            upstream_key = await self._admit(request, ex)
        except MetergateError as err:
            return await self._refuse(ex, err)
        try:
            return await self._forward(request, ex, upstream_key)
        finally:
            if not ex.recorded:
                # Cancelled (shutdown) or an unexpected failure: the spend must still be
                # recorded, so it is finished in a task the cancellation cannot reach.
                ex.error = ex.error or "aborted"
                # A request that reached the upstream is billed by the provider even if
                # nobody reads the answer, so it is charged (estimated) unless it failed.
                charge = ex.sent and ex.parsed.metered and (ex.status == 0 or ex.status < 300)
                if ex.meter is not None:
                    self._spawn(self._finish_stream(ex, ex.meter, charge))
                else:
                    self._spawn(self._finish(ex, None, output_text="", charge=charge))

    # ------------------------------------------------------------------ admission
    async def _admit(self, request: web.Request, ex: Exchange) -> str | None:
        """Identify the caller, read and parse the body, check the price.
        Returns the key to send upstream (None: the upstream's configured key)."""
        caller, passthrough_key = await self.keyring.resolve(request.headers)
        ex.caller = caller
        ex.tags = caller.tags + tuple(
            t
            for t in parse_tags(
                request.headers.get("X-Metergate-Tags"),
                max_count=self.settings.max_tags,
                max_len=self.settings.tag_max_len,
            )
            if t not in caller.tags
        )
        rel_path = _relative_path(request)
        ex.raw_path = _relative_raw_path(request)
        body = await _read_body(request, self.settings.server.max_body_bytes)
        if request.method == "POST":
            ex.parsed = ex.provider.parse_request(rel_path, body)
        else:
            ex.parsed = ParsedRequest(
                endpoint="other",
                metered=False,
                model=None,
                stream=False,
                max_output_tokens=None,
                end_user=None,
                body=body,
            )
        if ex.parsed.metered and ex.parsed.model is not None:
            ex.price = self.catalog.resolve(ex.parsed.model)
            if ex.price is None and self.fallback is None:
                raise UnknownModelPrice(
                    f"The model {ex.parsed.model!r} has no price in this proxy's catalog, so "
                    "its spend cannot be metered. Use a priced model, add the model to the "
                    "prices file, or set unknown_model: charge_fallback."
                )
            if self.gate is not None and self.gate.specs:
                await self._reserve(ex)
        return passthrough_key

    async def _reserve(self, ex: Exchange) -> None:
        """Hold the request's worst-case cost on every budget that applies (one store
        call), or raise the 402/429/503 refusal."""
        assert self.gate is not None and ex.caller is not None
        price = ex.price or self.fallback
        facts = RequestFacts(
            key=ex.caller.key_name,
            user=ex.caller.user,
            team=ex.caller.team,
            tags=ex.tags,
            model=ex.parsed.model,
            canonical_model=ex.price.model if ex.price else None,
        )
        if price is None or not self.gate.applicable(facts):
            return  # no budget applies: no counting, no store call
        input_bound = await self._input_upper_bound(ex)
        output_bound = (
            ex.parsed.max_output_tokens or price.max_output_tokens or DEFAULT_OUTPUT_BOUND
        )
        amount = worst_case_nanos(price, input_bound, output_bound)
        ex.reservation = await self.gate.reserve(
            ex.request_id, facts, amount, input_bound + output_bound
        )
        for name in ex.reservation.soft_exceeded:
            log.warning("soft budget %r exceeded by request %s", name, ex.request_id)

    async def _input_upper_bound(self, ex: Exchange) -> int:
        """Input tokens to reserve for. A small body's byte count is a strict bound (a
        BPE token is at least one byte) and cheaper than counting; a larger one is
        counted off the loop, with a margin for message framing and, for models whose
        tokenizer is only approximated (Claude), for the tokenizers' difference."""
        body_len = len(ex.parsed.body)
        if body_len <= BYTES_BOUND_LIMIT:
            return body_len
        model = ex.parsed.model or ""
        counted = await self._count_prompt(ex, model)
        _, approximate = encoding_name_for_model(model)
        factor = APPROXIMATE_MARGIN if approximate else EXACT_MARGIN
        return min(body_len, int(counted * factor) + BOUND_SLACK_TOKENS)

    async def _refuse(self, ex: Exchange, err: MetergateError) -> web.Response:
        ex.status = err.status
        ex.error = err.code
        if ex.caller is not None:
            # A refusal costs nothing, but an identified caller's refusal is on record.
            await self._record(ex)
        else:
            self._observe(ex, outcome=_refusal_outcome(err))
        return _error_response(err, ex.provider.name, ex.request_id)

    # ------------------------------------------------------------------ forwarding
    async def _forward(
        self, request: web.Request, ex: Exchange, upstream_key: str | None
    ) -> web.StreamResponse:
        up = ex.upstream
        key = upstream_key or up.api_key
        auth = ex.provider.upstream_auth_headers(key) if key else {}
        headers = upstream_request_headers(
            request.headers, auth, identity_only=ex.parsed.strip_usage_chunk
        )
        origin = self._origins[up.name]
        t_sent = time.perf_counter()
        ex.sent = True
        try:
            resp = await self.client.request(
                request.method,
                origin,
                origin.base_path + "/" + ex.raw_path,
                headers.items(),
                ex.parsed.body,
                self._timeouts[up.name],
            )
        except TimeoutError as exc:
            # A connect timeout: the upstream never got the request, so it is free.
            ex.sent = not isinstance(exc, UpstreamConnectError)
            return await self._upstream_failed(
                ex,
                # Either bound can fire here: connecting, or waiting for the headers.
                UpstreamTimeout(
                    f"The upstream {up.name!r} did not answer in time (connect timeout "
                    f"{up.connect_timeout_s:g} s, read timeout {up.read_timeout_s:g} s). "
                    "Try again later."
                ),
                t_sent,
            )
        except UpstreamClientError as exc:
            # Could not even connect: the upstream never saw the request, so it is free.
            ex.sent = not isinstance(exc, UpstreamConnectError)
            return await self._upstream_failed(
                ex,
                UpstreamUnavailable(
                    f"The upstream {up.name!r} could not be reached ({type(exc).__name__}). "
                    "Try again later."
                ),
                t_sent,
            )
        ttfb = time.perf_counter() - t_sent
        ex.upstream_wait += ttfb
        self.metrics.observe_ttfb(up.name, ttfb)
        ex.status = ex.upstream_status = resp.status
        # The provider's own request id ties a ledger record to the provider's invoice.
        upstream_id = resp.headers.get("x-request-id") or resp.headers.get("request-id")
        if upstream_id:
            ex.extra["upstream_request_id"] = upstream_id
        try:
            if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await self._relay_stream(request, ex, resp)
            return await self._relay_body(ex, resp)
        finally:
            resp.release()

    async def _upstream_failed(
        self, ex: Exchange, err: MetergateError, t_sent: float
    ) -> web.Response:
        ex.upstream_wait += time.perf_counter() - t_sent
        ex.status = err.status
        ex.error = err.code
        await self._record(ex)
        return _error_response(err, ex.provider.name, ex.request_id)

    async def _body_broken(
        self, ex: Exchange, status: int, err: MetergateError, error: str, t_read: float
    ) -> web.Response:
        """The upstream sent its headers, then broke off (or stalled) within the body.

        A provider that answered 2xx has done, and bills, the work even though its answer
        never arrived whole, so the request is charged with estimated usage (nothing
        counted for the lost output) rather than recorded at zero like a refusal.
        """
        ex.upstream_wait += time.perf_counter() - t_read
        charge = _charged(ex, status)
        ex.status = err.status
        ex.error = error
        await self._finish(ex, None, output_text="", charge=charge)
        return _error_response(err, ex.provider.name, ex.request_id)

    async def _relay_body(self, ex: Exchange, resp: UpstreamResponse) -> web.StreamResponse:
        t_read = time.perf_counter()
        try:
            raw = await resp.read()
        except TimeoutError:
            return await self._body_broken(
                ex,
                resp.status,
                UpstreamTimeout(f"The upstream {ex.upstream.name!r} stopped answering."),
                "upstream_timeout",
                t_read,
            )
        except UpstreamClientError:
            return await self._body_broken(
                ex,
                resp.status,
                UpstreamUnavailable(
                    f"The upstream {ex.upstream.name!r} broke the connection mid-response."
                ),
                "upstream_reset",
                t_read,
            )
        ex.upstream_wait += time.perf_counter() - t_read
        output_text = ""
        reported: Usage | None = None
        if ex.parsed.metered and 200 <= resp.status < 300:
            decoded = decode_body(raw, resp.headers.get("Content-Encoding"))
            if decoded is not None:
                reported, ex.served_model = ex.provider.usage_from_body(ex.parsed.endpoint, decoded)
                if reported is None or not reported.complete:
                    output_text = ex.provider.output_text_from_body(ex.parsed.endpoint, decoded)
        await self._finish(ex, reported, output_text=output_text, charge=_charged(ex, resp.status))
        headers = client_response_headers(resp.headers)
        headers[REQUEST_ID_HEADER] = ex.request_id
        if ex.parsed.metered:
            headers[COST_HEADER] = nanos_to_usd_str(ex.cost_nanos)
        return web.Response(status=resp.status, reason=resp.reason, body=raw, headers=headers)

    async def _relay_stream(
        self, request: web.Request, ex: Exchange, resp: UpstreamResponse
    ) -> web.StreamResponse:
        meter = ex.meter = ex.provider.stream_meter(ex.parsed)
        decoder: Decoder | None = None
        encoding = resp.headers.get("Content-Encoding")
        if encoding and encoding.lower() != "identity":
            decoder = decoder_for(encoding)
            if decoder is None:
                ex.extra["undecodable"] = encoding
        out = web.StreamResponse(
            status=resp.status, reason=resp.reason, headers=client_response_headers(resp.headers)
        )
        out.headers[REQUEST_ID_HEADER] = ex.request_id
        await out.prepare(request)
        charge = _charged(ex, resp.status)
        content = resp.content
        watchdog = asyncio.get_running_loop().create_task(self._watch_client(request, ex, resp))
        try:
            while True:
                t_read = time.perf_counter()
                try:
                    chunk = await content.readany()
                except TimeoutError:
                    ex.error = ex.error or "upstream_timeout"
                    break
                except UpstreamClientError:
                    # (or the watchdog closed it, having set "client_disconnect")
                    ex.error = ex.error or "upstream_reset"
                    break
                finally:
                    ex.upstream_wait += time.perf_counter() - t_read
                if not chunk:
                    break
                if decoder is None and "undecodable" not in ex.extra:
                    send = meter.feed(chunk)
                else:
                    send = chunk
                    if decoder is not None:
                        try:
                            meter.feed(decoder.decompress(chunk))
                        except Exception:  # a corrupt compressed stream: relay, can't meter
                            decoder = None
                            ex.extra["undecodable"] = encoding or ""
                if meter.completed and not ex.recorded:
                    # The terminator is in this chunk: record before the client sees it.
                    await self._finish_stream(ex, meter, charge)
                if send:
                    try:
                        await out.write(send)
                    except (ConnectionResetError, RuntimeError):
                        ex.error = "client_disconnect"
                        break
        finally:
            watchdog.cancel()
        if ex.error == "client_disconnect":
            resp.close()  # cancel the upstream request: stop generating tokens we pay for
        else:
            tail = meter.flush()
            try:
                if tail:
                    await out.write(tail)
            except (ConnectionResetError, RuntimeError):
                ex.error = "client_disconnect"
        if not ex.recorded:
            if ex.error is None:
                ex.error = "stream_incomplete"
            await self._finish_stream(ex, meter, charge)
        if ex.error in ("upstream_reset", "upstream_timeout"):
            # The upstream broke the stream: break the client's the same way (close
            # without ending the chunked body) rather than end it cleanly, so the client
            # sees the failure it would see from the provider instead of mistaking a
            # truncated answer for a complete one (the OpenAI SDK does not need [DONE]).
            if request.transport is not None:
                request.transport.close()
        elif ex.error != "client_disconnect":
            try:
                await out.write_eof()
            except (ConnectionResetError, RuntimeError):
                pass
        return out

    @staticmethod
    async def _watch_client(request: web.Request, ex: Exchange, resp: UpstreamResponse) -> None:
        """Cancel the upstream request as soon as the client of a stream goes away.

        Without this the proxy learns of a departed client only when it next writes to
        it, which may be minutes later: a reasoning model can think (and bill) for a
        long time between two events. aiohttp does not cancel the handler on a lost
        connection by default, but it sets ``request.transport`` to None; polling that
        costs one timer per stream. Closing ``resp`` wakes the relay loop's read.
        """
        while True:
            await asyncio.sleep(CLIENT_CHECK_INTERVAL_S)
            if request.transport is None:
                if ex.error is None and not ex.recorded:
                    ex.error = "client_disconnect"
                resp.close()
                return

    async def _finish_stream(self, ex: Exchange, meter: StreamMeter, charge: bool) -> None:
        if meter.malformed:
            self.metrics.sse_malformed.labels(ex.upstream.name).inc(meter.malformed)
        ex.served_model = meter.model
        reported = meter.usage
        exact = meter.completed and reported is not None and reported.complete
        if not exact and reported is not None:
            reported = reported.estimated()
        text = "" if exact else meter.output_text()
        await self._finish(ex, reported, output_text=text, charge=charge)

    # ------------------------------------------------------------- usage and money
    async def _finish(
        self, ex: Exchange, reported: Usage | None, *, output_text: str, charge: bool = True
    ) -> None:
        """Settle usage (estimating what is missing), price it, and record it."""
        if ex.recorded:
            return
        if charge and ex.parsed.metered:
            usage = reported
            if usage is None or not usage.complete or not usage.exact:
                usage = await self._estimate(ex, usage, output_text)
            ex.usage = usage
            price = self._price_for(ex)
            ex.cost_nanos = cost_nanos(price, usage) if price is not None else 0
        await self._record(ex)

    async def _estimate(self, ex: Exchange, reported: Usage | None, output_text: str) -> Usage:
        """Fill in what the provider did not report, counting with tiktoken.

        Reported numbers are kept (the provider's input count at ``message_start`` is
        better than ours); a counted output never lowers a reported one.
        """
        model = ex.served_model or ex.parsed.model or ""
        base = reported or Usage()
        input_tokens = base.input
        if input_tokens is None:
            input_tokens = await self._count_prompt(ex, model)
        counted_out = await self.counter.count_async(output_text, model) if output_text else 0
        output = max(base.output or 0, counted_out)
        return Usage(
            input=input_tokens,
            output=output,
            cached_input=base.cached_input,
            cache_write=base.cache_write,
            cache_write_1h=base.cache_write_1h,
            reasoning=base.reasoning,
            exact=False,
        )

    async def _count_prompt(self, ex: Exchange, model: str) -> int:
        """The prompt's tokens: its text counted, plus what the provider's format adds
        around it (about 4 tokens a chat message)."""
        body, endpoint = ex.parsed.body, ex.parsed.endpoint
        if len(body) <= INLINE_PARSE_LIMIT:
            prompt = ex.provider.prompt(body, endpoint)
        else:
            # Extracting the text of a large body is itself CPU work: off the loop too.
            loop = asyncio.get_running_loop()
            prompt = await loop.run_in_executor(None, ex.provider.prompt, body, endpoint)
        return await self.counter.count_async(prompt.text, model) + prompt.framing

    def _price_for(self, ex: Exchange) -> Price | None:
        """The served model's price when it has its own entry, else the requested one's,
        else the fallback (counted, and logged: never a silent zero)."""
        if ex.served_model and ex.served_model != ex.parsed.model:
            served = self.catalog.resolve(ex.served_model)
            if served is not None:
                ex.price = served
        if ex.price is None and self.fallback is not None:
            self.metrics.unpriced.labels(ex.upstream.name).inc()
            log.warning(
                "model %r has no catalog price; charged at the fallback price (request %s)",
                ex.parsed.model,
                ex.request_id,
            )
            ex.extra["priced_by"] = "fallback"
            return self.fallback
        return ex.price

    # ------------------------------------------------------------------ recording
    async def _record(self, ex: Exchange) -> None:
        """Write the ledger record (awaiting durability), then metrics and the log."""
        if ex.recorded:
            return
        ex.recorded = True
        caller = ex.caller or Caller(key_name="(unknown)")
        usage = ex.usage or Usage(input=0, output=0)
        latency_ms = (time.perf_counter() - ex.t0) * 1000.0
        extra = dict(ex.extra)
        if ex.served_model and ex.served_model != ex.parsed.model:
            extra["served_model"] = ex.served_model
        record = LedgerRecord(
            id=ex.request_id,
            ts_ms=ex.ts_ms,
            key_name=caller.key_name,
            team=caller.team,
            user=caller.user,
            end_user=ex.parsed.end_user,
            tags=ex.tags,
            upstream=ex.upstream.name,
            endpoint=ex.parsed.endpoint,
            model=ex.parsed.model or "",
            stream=ex.parsed.stream,
            status=ex.status,
            input_tokens=usage.input or 0,
            cached_input_tokens=usage.cached_input or 0,
            cache_write_tokens=usage.cache_write or 0,
            output_tokens=usage.output or 0,
            reasoning_tokens=usage.reasoning or 0,
            cost_nanos=ex.cost_nanos,
            exact=usage.exact,
            latency_ms=round(latency_ms, 3),
            error=ex.error,
            extra=extra,
        )
        # The settle joins the gate's next store batch at once (no task); the ledger
        # write runs meanwhile, and the charge is applied even if this caller is
        # cancelled while it waits.
        settling = self._settle_nowait(ex)
        await self._write_ledger(record)
        if settling is not None:
            await settling
        self._observe(ex, outcome=_outcome(ex))
        self.metrics.observe_done(
            ex.upstream.name, latency_ms / 1000.0, max(0.0, latency_ms / 1000.0 - ex.upstream_wait)
        )
        if self.settings.server.access_log and access_log.isEnabledFor(logging.INFO):
            log_line(access_log, orjson.dumps(_access_entry(record)).decode())

    async def _write_ledger(self, record: LedgerRecord) -> None:
        # A future, no task per request. It completes when the record is durable: in
        # the spool (SQLite), or in the store, whose calls the writer bounds per batch
        # with wait_for_store (store_timeout_ms while the loop was free to listen, 2 s
        # at most), so a slow or paused Redis never holds a response for long.
        try:
            await self.writer.write_nowait(record)
        except Exception as exc:
            await self._journal_record(record, exc)

    async def _journal_record(self, record: LedgerRecord, exc: Exception) -> None:
        """The store failed or is too slow (Redis down, disk full). The client still
        gets its answer; the record goes to the local journal, which is replayed when
        the store is back (appends are idempotent by id, so a write that did land after
        all is not counted twice)."""
        self.metrics.store_errors.labels("ledger_write").inc()
        if self.journal is not None:
            try:
                await self.journal.record_ledger([record])
                return
            except OSError:
                pass
        log.error(
            "ledger write failed and no journal took it (%s); record: %s",
            exc,
            orjson.dumps(record.to_dict()).decode(),
        )

    def _settle_nowait(self, ex: Exchange) -> asyncio.Future[Any] | None:
        """Queue the settle of the request's reservation, exactly once; the future
        completes when the store applied it or the journal took it.

        Never reached the upstream: release it. Usage known exactly, or the provider
        answered with an error (it bills nothing): charge that. Otherwise (a broken
        stream, a timeout, missing usage) keep at least the hold: an estimate can miss
        what the provider bills but never streams, such as reasoning tokens."""
        res = ex.reservation
        if res is None or self.gate is None:
            return None
        if not ex.sent:
            return self.gate.release_nowait(res)
        usage = ex.usage
        tokens = (usage.input or 0) + (usage.output or 0) if usage else res.tokens
        if usage is not None and usage.exact:
            charge = ex.cost_nanos
        elif ex.upstream_status >= 400:
            charge = 0
        else:
            charge = max(ex.cost_nanos, res.amount_nanos)
        return self.gate.settle_nowait(res, charge, tokens=tokens)

    def _observe(self, ex: Exchange, *, outcome: str) -> None:
        team = (ex.caller.team if ex.caller else None) or "none"
        model = self.metrics.model_label(ex.price.model if ex.price else None)
        self.metrics.observe_request(
            upstream=ex.upstream.name,
            model=model,
            team=team,
            outcome=outcome,
            usage=ex.usage,
            cost_nanos=ex.cost_nanos,
            key=ex.caller.key_name if ex.caller else None,
            user=ex.caller.user if ex.caller else None,
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for records still being finished in the background (at shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


# ---------------------------------------------------------------------- helpers
def _new_request_id() -> str:
    """``mgr_`` + 12 hex digits of milliseconds + 16 random: time-ordered, so ledger
    inserts append to the primary-key index instead of landing at random places. The
    random part needs uniqueness, not secrecy: ``getrandbits`` (seeded from the OS at
    start) avoids a ``getrandom`` system call per request."""
    return f"mgr_{time.time_ns() // 1_000_000:012x}{random.getrandbits(64):016x}"


def _charged(ex: Exchange, status: int) -> bool:
    """Providers bill only successful requests."""
    return ex.parsed.metered and 200 <= status < 300


def _relative_path(request: web.Request) -> str:
    """The decoded path after ``/{upstream}/``; refuses traversal."""
    path = request.match_info.get("path", "")
    segments = path.split("/")
    if ".." in segments or "." in segments or "\\" in path or "\x00" in path:
        raise BadRequest(
            "The request path may not contain '.' or '..' segments.", code="invalid_path"
        )
    return path


def _relative_raw_path(request: web.Request) -> str:
    """The still-encoded path after ``/{upstream}/``, with the query string, so the
    upstream receives exactly the bytes the client sent."""
    raw = request.raw_path
    if not raw.startswith("/"):
        # An absolute-form target (``POST http://host/openai/v1/... HTTP/1.1``, RFC 9112
        # 3.2.2): aiohttp's raw_path is then the whole URL. Its host is ignored, as the
        # Host header is (upstreams are fixed by config); only its path is relayed.
        url = request.rel_url
        raw = url.raw_path + ("?" + url.raw_query_string if url.raw_query_string else "")
    prefix_len = len(request.match_info["upstream"]) + 2  # "/name/"
    rel = raw[prefix_len:]
    # Only the path can be used to traverse; the query string is data and is relayed as
    # sent (an encoded '/' or '.' in a query value, e.g. a pagination cursor, is legal).
    lowered = rel.partition("?")[0].lower()
    if "%2e" in lowered or "%2f" in lowered or "%5c" in lowered:
        raise BadRequest(
            "The request path may not contain encoded '.', '/' or '\\'.", code="invalid_path"
        )
    return rel


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(
            f"The request body is {request.content_length} bytes; this proxy accepts at most "
            f"{limit} bytes."
        )
    content = request.content
    if content.is_eof() and not content.exception():
        # The whole body is already here (every small request): take it in one join,
        # without read()'s loop, bytearray and second copy.
        body = content.read_nowait()
        if len(body) <= limit:
            return body
        raise PayloadTooLarge(
            f"The request body is larger than this proxy's limit of {limit} bytes."
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"The request body is larger than this proxy's limit of {limit} bytes."
        ) from None
    except web.RequestPayloadError:
        # aiohttp could not decode the body (a corrupt gzip/deflate/br body, or broken
        # chunked framing). Without this it escapes as a plain-text 500.
        raise BadRequest(
            "The request body could not be read: its Content-Encoding or chunked framing "
            "is corrupt. Send the body uncompressed, or compressed as its "
            "Content-Encoding header says.",
            code="invalid_body",
        ) from None


def _error_response(err: MetergateError, wire_format: str, request_id: str) -> web.Response:
    headers = dict(err.headers)
    headers[REQUEST_ID_HEADER] = request_id
    return web.Response(
        status=err.status,
        body=err.render(wire_format),
        content_type="application/json",
        headers=headers,
    )


def _refusal_outcome(err: MetergateError) -> str:
    if err.status == 402:
        return "refused_budget"
    if err.status == 429:
        return "refused_rate"
    return status_class(err.status)


def _outcome(ex: Exchange) -> str:
    if ex.error in ("upstream_unavailable", "upstream_timeout") and ex.status >= 500:
        return "error"
    if ex.status in (402, 429) and ex.error in ("budget_exceeded", "rate_limit_exceeded"):
        return "refused_budget" if ex.status == 402 else "refused_rate"
    return status_class(ex.status) if ex.status else "error"


def _access_entry(record: LedgerRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "key": record.key_name,
        "team": record.team,
        "upstream": record.upstream,
        "endpoint": record.endpoint,
        "model": record.model,
        "stream": record.stream,
        "status": record.status,
        "input_tokens": record.input_tokens,
        "output_tokens": record.output_tokens,
        "cost_usd": nanos_to_usd_str(record.cost_nanos),
        "exact": record.exact,
        "latency_ms": record.latency_ms,
        "error": record.error,
    }
