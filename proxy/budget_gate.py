"""The budget gate: reserve before forwarding, settle after, whatever the store does.

The request path (the pipeline's part)::

    reservation = await gate.reserve(request_id, facts, upper_bound_nanos, tokens)
    ... forward, relay, price the actual usage ...
    await gate.settle(reservation, actual_nanos, tokens=actual_tokens)   # exactly once
    # or, when the request never reached the upstream:
    await gate.release(reservation)

:class:`BudgetGate` turns the specs that match into store items (one budget key per
spec and period, see :func:`proxy.budget.budget_key`); a request that no budget
matches makes no store call. The reserves, settles and releases of concurrent requests
go to the store together, as ONE call per batch (:mod:`proxy.budget_batch`,
:meth:`~proxy.store.base.Store.budget_batch`): while one batch is in flight the next
one fills, so under load a request costs a fraction of a round trip, and when idle a
call leaves in the next turn of the event loop. Each reservation of a batch is still
checked and held all or nothing on its own, in order, in one atomic step.

Guarantees, and where they stop:

- A hard cap holds exactly under any concurrency and any number of replicas on one
  store: the check and the hold are one atomic step, and a hold is the request's
  worst case. ``spent`` can pass the limit only by what the estimates under-counted
  (a settle always charges the actual cost in full; spend is never dropped).
- A reservation left by a crashed replica is released after its ttl. The spend of
  that request, known to nobody once the replica is gone (its ledger record was never
  written either), is not charged; charging the whole hold instead would bill money
  that was perhaps never spent and could never be reconciled with the ledger. The
  ttl must exceed the longest request (a stream that outlives its hold is still
  charged in full at settle, but the cap does not cover it in between).
- A request that straddles a period boundary is charged to the period it started in.
- While the store is unreachable under ``fail_open``, requests are admitted without
  any check (caps and rate limits are not enforced), and every settle that cannot
  reach the store is written to the :class:`~proxy.journal.Journal` and replayed
  exactly once when it returns; under ``fail_closed`` they are refused with 503.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar

from proxy.budget import (
    BudgetSpec,
    BudgetStatus,
    PeriodWindow,
    RequestFacts,
    Reservation,
    budget_key,
    matches,
    period_window,
    rate_key,
)
from proxy.budget_batch import GroupCommit
from proxy.errors import BudgetExceeded, RateLimited, StoreUnavailable
from proxy.store.base import (
    BudgetState,
    RateItem,
    ReserveCall,
    ReserveItem,
    ReserveResult,
    SettleCall,
    Store,
)

if TYPE_CHECKING:
    from proxy.journal import Journal

__all__ = [
    "DEFAULT_RESERVATION_TTL_S",
    "DEFAULT_STORE_TIMEOUT_S",
    "ON_STORE_ERROR",
    "BudgetGate",
    "wait_for_store",
]

log = logging.getLogger("metergate.budget")

ON_STORE_ERROR: Final = ("fail_open", "fail_closed")
DEFAULT_STORE_TIMEOUT_S: Final = 0.05
DEFAULT_RESERVATION_TTL_S: Final = 900.0
#: The longest a store call waits while the store keeps answering other calls or the
#: event loop is busy elsewhere (a burst queued in this process); see _await_store.
STORE_MAX_WAIT_S: Final = 2.0
_T = TypeVar("_T")
#: What a batched store call gives each caller: a reserve's result, whether a settle
#: was applied, or the exception of that call (returned, not raised: see _flush).
_Outcome = ReserveResult | bool | Exception
_NANOS_PER_USD: Final = 1_000_000_000
#: Distinct request facts (and sets of specs) remembered by BudgetGate.applicable and
#: BudgetGate._plan before the caches start over.
_PLAN_CACHE_SIZE: Final = 4096


class _Plan(NamedTuple):
    """What a reserve on one set of specs holds in the current periods (see _plan)."""

    specs: tuple[BudgetSpec, ...]
    windows: dict[str, tuple[BudgetSpec, PeriodWindow]]  # budget key -> spec, window
    keys: tuple[str, ...]  # the budget keys, in spec order
    budgets: tuple[tuple[str, int, bool], ...]  # budget key, limit, hard
    rpm: tuple[tuple[str, int], ...]  # rate key, requests per minute
    tpm: tuple[tuple[str, int], ...]  # rate key, tokens per minute
    start: float  # valid for start <= time.time() < end (unix s)
    end: float


def _usd(nanos: int) -> str:
    return str((Decimal(nanos) / _NANOS_PER_USD).quantize(Decimal("0.01")))


class BudgetGate:
    """Applies the configured budgets to requests (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        specs: Sequence[BudgetSpec],
        *,
        journal: Journal | None = None,
        on_store_error: str = "fail_open",
        store_timeout_s: float = DEFAULT_STORE_TIMEOUT_S,
        reservation_ttl_s: float = DEFAULT_RESERVATION_TTL_S,
    ) -> None:
        if on_store_error not in ON_STORE_ERROR:
            raise ValueError(
                f"on_store_error must be fail_open or fail_closed, not {on_store_error!r}."
            )
        self.store = store
        self.journal = journal
        self.on_store_error = on_store_error
        self.store_timeout_s = store_timeout_s
        self.reservation_ttl_s = reservation_ttl_s
        self.specs: tuple[BudgetSpec, ...] = tuple(specs)
        # For metrics: store calls that failed or timed out; settles neither the store
        # nor the journal took (their spend is missing from the budgets).
        self.store_errors = 0
        self.lost_settles = 0
        #: Requests admitted without a budget check (fail_open, store unavailable).
        self.admitted_unchecked = 0
        # Store calls that completed (the store's signs of life, see wait_for_store).
        self.store_answers = 0
        # Group commit: the reserves, settles and releases of concurrent requests go to
        # the store as one call per batch (see proxy.budget_batch and _flush).
        self._batch: GroupCommit[ReserveCall | SettleCall, _Outcome] = GroupCommit(
            self._flush, name="metergate-budget-batch"
        )
        # spec -> (spec, window start, window end (unix s), window, budget key): the
        # current period of each spec, valid until its end (see _current_window).
        self._windows: dict[int, tuple[BudgetSpec, float, float, PeriodWindow, str]] = {}
        # The specs that match a request, by its facts (callers, teams and models repeat;
        # bounded by _PLAN_CACHE_SIZE), and what a reserve on them sends (see _plan).
        self._applicable: dict[RequestFacts, tuple[BudgetSpec, ...]] = {}
        # By id() of the tuple applicable() returned; the entry keeps that tuple alive,
        # so its id is not reused while the entry exists (specs hold dicts: unhashable).
        self._plans: dict[int, _Plan] = {}

    async def drain(self) -> None:
        """Wait for queued reserves and settles (also those whose callers were
        cancelled); call it at shutdown, before closing the store and the journal."""
        await self._batch.drain()

    def replace_specs(self, specs: Sequence[BudgetSpec]) -> None:
        """Swap the budgets at run time; requests in flight keep their reservations."""
        self.specs = tuple(specs)
        self._windows = {}
        self._applicable = {}
        self._plans = {}

    def _current_window(self, spec: BudgetSpec, now: datetime | None) -> tuple[PeriodWindow, str]:
        """The period of ``spec`` that contains ``now``, and its budget key. Without an
        explicit ``now`` it is computed once per spec and period, not per request."""
        if now is not None:
            window = period_window(spec, now)
            return window, budget_key(spec, window)
        t = time.time()
        cached = self._windows.get(id(spec))
        if cached is not None and cached[0] is spec and cached[1] <= t < cached[2]:
            return cached[3], cached[4]
        window = period_window(spec)
        key = budget_key(spec, window)
        start = -math.inf if window.start is None else window.start.timestamp()
        end = math.inf if window.end is None else window.end.timestamp()
        self._windows[id(spec)] = (spec, start, end, window, key)
        return window, key

    def applicable(self, facts: RequestFacts) -> tuple[BudgetSpec, ...]:
        """The budgets whose scope matches the request (remembered by its facts: the
        pipeline asks, then reserve asks again, for every request)."""
        try:
            specs = self._applicable.get(facts)
        except TypeError:  # unhashable facts (tags in a list): match them uncached
            return tuple(spec for spec in self.specs if matches(spec, facts))
        if specs is None:
            if len(self._applicable) >= _PLAN_CACHE_SIZE:
                self._applicable.clear()
            specs = self._applicable[facts] = tuple(
                spec for spec in self.specs if matches(spec, facts)
            )
        return specs

    def _plan(self, specs: tuple[BudgetSpec, ...], now: datetime | None) -> _Plan:
        """What a reserve on ``specs`` holds: their budget keys in the current periods
        and their rate limits, computed once per set of specs and period (not per
        request) unless an explicit ``now`` is given."""
        if now is None:
            plan = self._plans.get(id(specs))
            if plan is not None and plan.specs is specs and plan.start <= time.time() < plan.end:
                return plan
        windows: dict[str, tuple[BudgetSpec, PeriodWindow]] = {}
        budgets: list[tuple[str, int, bool]] = []
        rpm: list[tuple[str, int]] = []
        tpm: list[tuple[str, int]] = []
        start, end = -math.inf, math.inf
        for spec in specs:
            if spec.limit_nanos is not None:
                window, key = self._current_window(spec, now)
                windows[key] = (spec, window)
                budgets.append((key, spec.limit_nanos, spec.enforce == "hard"))
                if window.start is not None:
                    start = max(start, window.start.timestamp())
                if window.end is not None:
                    end = min(end, window.end.timestamp())
            if spec.requests_per_minute is not None:
                rpm.append((rate_key(spec, "rpm"), spec.requests_per_minute))
            if spec.tokens_per_minute is not None:
                tpm.append((rate_key(spec, "tpm"), spec.tokens_per_minute))
        plan = _Plan(
            specs, windows, tuple(windows), tuple(budgets), tuple(rpm), tuple(tpm), start, end
        )
        if now is None:
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[id(specs)] = plan
        return plan

    async def reserve(
        self,
        request_id: str,
        facts: RequestFacts,
        amount_nanos: int,
        tokens: int,
        *,
        now: datetime | None = None,
    ) -> Reservation:
        """Hold ``amount_nanos`` (the request's worst-case cost) on every matching budget
        and take one request and ``tokens`` from their rate limits: one store call.

        Raises :class:`BudgetExceeded` (402) or :class:`RateLimited` (429); when the store
        fails or is slower than ``store_timeout_s``: :class:`StoreUnavailable` (503) under
        fail_closed, else admits the request with nothing held. The call goes with the
        gate's next batch; ``store_timeout_s`` bounds each batch (see wait_for_store), so
        a call queued behind a batch in flight waits at most about twice that.
        """
        plan = self._plan(self.applicable(facts), now)
        windows = plan.windows
        items = [ReserveItem(key, limit, amount_nanos, hard) for key, limit, hard in plan.budgets]
        rates = [RateItem(key, per_minute, 1) for key, per_minute in plan.rpm]
        if plan.tpm:
            rates += [RateItem(key, per_minute, tokens, True) for key, per_minute in plan.tpm]
        reservation = Reservation(
            id=request_id,
            keys=plan.keys,
            amount_nanos=amount_nanos,
            tokens=tokens,
            created=time.time(),
            store_held=False,
            has_rates=bool(rates),
        )
        if not items and not rates:
            return reservation  # no budget applies: no store call at all
        result = await self._batch.submit(
            ReserveCall(request_id, items, self.reservation_ttl_s, rates)
        )
        if isinstance(result, (StoreUnavailable, TimeoutError)):
            if self.on_store_error == "fail_closed":
                raise StoreUnavailable(
                    "The budget store is unavailable, and this proxy refuses requests it "
                    "cannot check against their budgets. Try again shortly."
                ) from result
            self.admitted_unchecked += 1
            log.warning("budget store unavailable, admitting %s unchecked: %s", request_id, result)
            return reservation
        if isinstance(result, Exception):
            raise result  # a malformed call (a bug): ValueError or TypeError
        assert isinstance(result, ReserveResult)
        if result.ok:
            reservation.store_held = True
            reservation.soft_exceeded = tuple(
                windows[k][0].name for k in result.soft_exceeded if k in windows
            )
            return reservation
        if result.kind == "budget" and result.key in windows:
            spec, window = windows[result.key]
            raise self._exceeded(spec, window, result.state or BudgetState(0, 0), amount_nanos)
        if result.kind == "rate":
            name = (result.key or "").rsplit(":", 1)[0]
            if result.retry_after_s is None:
                raise RateLimited(
                    f"This request needs more tokens than the budget {name!r} allows per "
                    "minute, so it can never be admitted; lower max_tokens or the prompt."
                )
            retry = max(1, math.ceil(result.retry_after_s))
            raise RateLimited(
                f"The rate limit of the budget {name!r} is reached; retry in {retry} s.",
                headers={"Retry-After": str(retry)},
            )
        raise RuntimeError(f"The reservation id {request_id!r} was already used and settled.")

    async def _await_store(self, call: Coroutine[Any, Any, _T]) -> _T:
        """One store call, bounded by :func:`wait_for_store`; counts the store's answers."""
        result = await wait_for_store(
            call, self.store_timeout_s, answers=lambda: self.store_answers
        )
        self.store_answers += 1
        return result

    async def _flush(
        self, batch: list[tuple[ReserveCall | SettleCall, asyncio.Future[_Outcome]]]
    ) -> None:
        """One store call for a batch of reserves, settles and releases (see
        :class:`GroupCommit`).

        A reserve whose caller is gone before it was sent is not sent; one whose caller
        went away while it was in flight is released, so that its hold does not wait
        for its ttl. Settles run whether or not their callers still wait (a charge is
        never dropped): those the store did not take go to the journal, each exactly
        once. Failed releases are only logged (their holds expire after the ttl)."""
        reserves: list[tuple[ReserveCall, asyncio.Future[_Outcome]]] = []
        settles: list[tuple[SettleCall, asyncio.Future[_Outcome]]] = []
        for call, future in batch:
            if isinstance(call, SettleCall):
                settles.append((call, future))
            elif not future.done():
                reserves.append((call, future))
        if not reserves and not settles:
            return
        reserved: Sequence[ReserveResult | Exception]
        settled: Sequence[bool | Exception]
        try:
            reserved, settled = await self._await_store(
                self.store.budget_batch([c for c, _ in reserves], [c for c, _ in settles])
            )
        except (StoreUnavailable, TimeoutError) as exc:
            reserved, settled = [exc] * len(reserves), [exc] * len(settles)
        for (call, future), result in zip(reserves, reserved, strict=True):
            if isinstance(result, (StoreUnavailable, TimeoutError)):
                self.store_errors += 1
            if not future.done():
                future.set_result(result)
            elif isinstance(result, ReserveResult) and result.ok:
                self._batch.submit(SettleCall(call.reservation_id, release=True))
        failed: list[tuple[SettleCall, asyncio.Future[_Outcome], Exception]] = []
        for (settle, future), outcome in zip(settles, settled, strict=True):
            if isinstance(outcome, (StoreUnavailable, TimeoutError)):
                self.store_errors += 1
                if not settle.release:
                    failed.append((settle, future, outcome))
                    continue
                log.warning(
                    "release of %s failed; it expires on its own: %s",
                    settle.reservation_id,
                    outcome,
                )
            if not future.done():
                future.set_result(outcome)
        if failed:
            journaled = await asyncio.gather(
                *(self._journal_settle(settle, exc) for settle, _, exc in failed)
            )
            for (_, future, _), outcome in zip(failed, journaled, strict=True):
                if not future.done():
                    future.set_result(outcome)

    async def _journal_settle(self, call: SettleCall, exc: Exception) -> bool | Exception:
        """Write a settle the store did not take to the journal; False when journaled."""
        reason: BaseException = exc
        if self.journal is not None:
            assert isinstance(call.actual, Mapping)  # the gate settles by key
            try:
                await self.journal.record_settle(call.reservation_id, call.actual, call.tokens)
                return False
            except OSError as journal_exc:
                reason = journal_exc
        self.lost_settles += 1
        log.error(
            "the settle of %s is lost (store and journal failed): %s", call.reservation_id, reason
        )
        return exc

    @staticmethod
    def _exceeded(
        spec: BudgetSpec, window: PeriodWindow, state: BudgetState, amount: int
    ) -> BudgetExceeded:
        # Local wall time with its offset: what a person reading the header expects.
        reset = "never" if window.end is None else window.end.astimezone(spec.timezone).isoformat()
        assert spec.limit_nanos is not None
        return BudgetExceeded(
            f"This request would exceed the budget {spec.name!r}: "
            f"${_usd(state.spent_nanos)} of ${_usd(spec.limit_nanos)} is spent, "
            f"${_usd(state.reserved_nanos)} is held by requests in flight, and this "
            f"request may cost up to ${_usd(amount)}. "
            + ("The budget does not reset." if window.end is None else f"It resets at {reset}."),
            headers={"X-Metergate-Budget": spec.name, "X-Metergate-Budget-Reset": reset},
        )

    async def settle(
        self, reservation: Reservation, actual_nanos: int, *, tokens: int | None = None
    ) -> None:
        """Charge the actual cost to the reservation's budgets, exactly once.

        Call it for every request that reached the upstream, with the larger of
        estimate and count when usage is not exact. Never raises for store failures:
        a settle that cannot reach the store goes to the journal (replayed later).
        Cancelling the caller (a client that disconnects) does not cancel the charge:
        it is queued in the gate's settle batch, which runs it regardless.
        """
        settling = self.settle_nowait(reservation, actual_nanos, tokens=tokens)
        if settling is not None:
            result = await settling
            if isinstance(result, (ValueError, TypeError)):
                raise result  # a malformed amount (a bug)

    def settle_nowait(
        self, reservation: Reservation, actual_nanos: int, *, tokens: int | None = None
    ) -> asyncio.Future[_Outcome] | None:
        """:meth:`settle`, queued: the charge goes with the gate's next batch whether or
        not anyone awaits the returned future (None when there was nothing to settle).
        The future completes once the store applied it or the journal took it; awaiting
        it costs no task, so a caller can wait for it next to other work."""
        if reservation.done:
            return None
        reservation.done = True
        if not reservation.keys and not reservation.has_rates:
            return None
        return self._batch.submit(
            SettleCall(reservation.id, dict.fromkeys(reservation.keys, actual_nanos), tokens=tokens)
        )

    async def release(self, reservation: Reservation) -> None:
        """Drop the holds of a request that cost nothing (never reached the upstream).
        A failed release is only logged: the hold then expires after its ttl."""
        releasing = self.release_nowait(reservation)
        if releasing is not None:
            await releasing

    def release_nowait(self, reservation: Reservation) -> asyncio.Future[_Outcome] | None:
        """:meth:`release`, queued (see :meth:`settle_nowait`)."""
        if reservation.done:
            return None
        reservation.done = True
        if not reservation.keys and not reservation.has_rates:
            return None  # no budget applied: nothing to give back
        # Even when store_held is False, a reserve that timed out may have landed.
        return self._batch.submit(SettleCall(reservation.id, release=True))

    async def status(self, now: datetime | None = None) -> list[BudgetStatus]:
        """Every budget with a spend limit: current period, key and counters."""
        capped = [(s, period_window(s, now)) for s in self.specs if s.limit_nanos is not None]
        keys = [budget_key(spec, window) for spec, window in capped]
        states = await self.store.budget_states(keys)
        return [
            BudgetStatus(spec, window, key, states[key])
            for (spec, window), key in zip(capped, keys, strict=True)
        ]


async def wait_for_store(
    call: Awaitable[_T],
    timeout_s: float,
    *,
    answers: Callable[[], int],
    max_wait_s: float = STORE_MAX_WAIT_S,
) -> _T:
    """Await one store call; raise TimeoutError only when the *store* is slow.

    ``answers()`` counts the store calls that completed so far (any caller's): the
    store's signs of life. The call gives up after an interval of ``timeout_s`` in which
    the event loop was free to listen (its timer fired on time, and its thread spent
    less than half the interval on the CPU) and ``answers()`` did not move: the store
    itself answered nothing. Intervals the loop spent at work elsewhere (a burst of
    requests, a pool of new connections being set up), or in which the store answered
    other calls, do not count, up to ``max_wait_s`` in all. So a store that is down,
    paused or partitioned fails a call after about ``timeout_s``, while a healthy store
    behind a queue in this process does not; a proxy that is saturated *and* has a slow
    store may hold a request up to ``max_wait_s``.

    Fix (found by tests/test_budget_replicas.py): the gate used a plain
    ``wait_for(call, store_timeout_s)``. A burst queues its store calls inside the
    process, so a call took longer than 50 ms while Redis answered each in well under a
    millisecond; under fail_open each such reserve admitted its request unchecked, and
    500 concurrent requests on two replicas against a cap that fits 173 admitted 388 to
    481 of them. Cancelling the caller cancels the call.

    ``call`` is a coroutine or a future, awaited in the caller's own task: no task and
    no ``asyncio.wait`` per call, only one timer (it runs once per store batch of the
    gate and of the ledger writer, i.e. about twice per request when the proxy is idle).
    When the store is judged silent the timer cancels the wait, as ``asyncio.timeout``
    does, and the call is cancelled with it.
    """
    loop = asyncio.get_running_loop()
    watch = _StoreWatch(loop, timeout_s, max(max_wait_s, timeout_s), answers)
    try:
        async with asyncio.timeout(None) as deadline:
            watch.start(deadline)
            return await call
    except TimeoutError:
        if watch.expired:
            raise TimeoutError(f"the store answered nothing for {timeout_s:g} s") from None
        raise  # the call's own
    finally:
        watch.stop()


class _StoreWatch:
    """The timer of :func:`wait_for_store`: every ``timeout_s`` it decides whether the
    store was silent while the loop was free to listen, and if so expires the wait."""

    __slots__ = (
        "_answers",
        "_cpu_from",
        "_deadline",
        "_handle",
        "_loop",
        "_max_total",
        "_seen",
        "_started",
        "_timeout_s",
        "_waited_from",
        "expired",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout_s: float,
        max_total_s: float,
        answers: Callable[[], int],
    ) -> None:
        self._loop = loop
        self._timeout_s = timeout_s
        self._max_total = max_total_s
        self._answers = answers
        self._deadline: asyncio.Timeout | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._started = self._waited_from = loop.time()
        self._cpu_from = time.thread_time()
        self._seen = answers()
        self.expired = False

    def start(self, deadline: asyncio.Timeout) -> None:
        self._deadline = deadline
        self._handle = self._loop.call_at(self._waited_from + self._timeout_s, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        now = self._loop.time()
        interval = now - self._waited_from
        cpu = time.thread_time()
        loop_was_busy = (
            interval > self._timeout_s * 1.5  # our timer fired late
            or cpu - self._cpu_from > interval / 2  # the loop was at work
        )
        seen = self._answers()
        store_answered = seen != self._seen
        if (not loop_was_busy and not store_answered) or now - self._started >= self._max_total:
            self._handle = None
            self.expired = True
            assert self._deadline is not None
            self._deadline.reschedule(now)  # cancels the wait, as a timeout does
            return
        self._waited_from, self._cpu_from, self._seen = now, cpu, seen
        self._handle = self._loop.call_at(now + self._timeout_s, self._check)
