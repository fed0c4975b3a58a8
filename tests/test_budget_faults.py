"""Budgets when Redis fails: killed and restarted under load (fail-open: every request
served, every charge journaled and replayed exactly once), down under fail_closed (503
in the provider's shape), and slow (paused) without stalling requests; and the wait
that tells a slow store from a queue inside the proxy (``wait_for_store``).

Each test runs its own ``redis-server`` (started by :mod:`tests.redis_servers`, stopped
by PID), so killing or pausing it disturbs no other test. The kill test keeps Redis's
data across the kill (``--appendonly yes --appendfsync always``): holds and charges made
before the kill survive it, which makes "after replay, the Redis totals equal the fake
upstream's usage exactly" a clean assertion. Without ``redis-server`` these tests fail.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.budget_gate import wait_for_store
from proxy.store import BudgetState, open_store
from tests.conftest import KEY_A, KEY_B, ProxyFactory
from tests.fake_upstream import FakeUpstream
from tests.redis_servers import RedisServer, start_standalone
from tests.test_budget_replicas import (
    MESSAGES,
    MODEL,
    ReplicaFactory,
    independent_cost,
    namespace,
    replica_config,
    replicas,  # noqa: F401  (the fixture is used by name)
    wait_until,
)

ALL = {"name": "all", "scope": {}, "limit_usd": "1000", "period": "total"}


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own that keeps every acknowledged write across a kill -9."""
    server = start_standalone(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, without persistence (fast writes)."""
    server = start_standalone(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


def journal_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("journal-*.jsonl")) if directory.exists() else []


async def test_redis_killed_mid_run_fail_open_loses_no_spend(
    durable_redis: RedisServer, fake: FakeUpstream, replicas: ReplicaFactory, tmp_path: Path
) -> None:
    """Two replicas, 360 requests from the openai SDK, Redis SIGKILLed a quarter of the
    way in and restarted on its port a second later. Every request completes; requests
    in flight at the kill settle into the journal (their holds survive in the AOF),
    requests during the outage are admitted unchecked and journaled, and once Redis is
    back each journal is replayed exactly once: spent == the fake's usage, priced
    independently, to the nano-dollar, with nothing left reserved, and it stays so."""
    store_url = f"{durable_redis.url}/0?namespace={namespace()}"
    config = replica_config(fake.url, store_url, [ALL], tmp_path)
    group = await replicas(config)
    clients = [group[0].openai(KEY_A), group[1].openai(KEY_B)]
    total, workers = 360, 16
    rng = random.Random(7)
    plans = [(rng.randrange(10, 400), rng.randrange(1, 60)) for _ in range(total)]
    queue = list(range(total))
    done_at: list[float] = []
    failures: list[BaseException] = []
    quarter = asyncio.Event()

    async def worker(w: int) -> None:
        while queue:
            i = queue.pop()
            tokens_in, tokens_out = plans[i]
            headers = {
                "X-Fake-Input": str(tokens_in),
                "X-Fake-Output": str(tokens_out),
                "X-Fake-Delay-Ms": "100",  # spreads the run over a few seconds
            }
            try:
                completion = await clients[i % 2].chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_tokens=64, extra_headers=headers
                )
                assert completion.usage is not None
                assert completion.usage.completion_tokens == tokens_out
            except Exception as exc:
                failures.append(exc)
            done_at.append(time.monotonic())
            if len(done_at) >= total // 4:
                quarter.set()

    run = asyncio.gather(*(worker(w) for w in range(workers)))
    try:
        await asyncio.wait_for(quarter.wait(), 30)
        killed_at = time.monotonic()
        durable_redis.kill()  # SIGKILL, with requests in flight
        await asyncio.sleep(1.0)
        await asyncio.to_thread(durable_redis.start)  # same port, same AOF
        restarted_at = time.monotonic()
        await asyncio.wait_for(run, 60)
    finally:
        for client in clients:
            await client.close()
    logs = "\n".join(r.log() for r in group)
    unchecked = sum(r.log(None).count("admitting") for r in group)
    assert not failures, (failures[:3], logs)
    assert len(done_at) == total
    during = sum(killed_at < t < restarted_at for t in done_at)
    before = sum(t <= killed_at for t in done_at)
    print(
        f"\n{before} requests before the kill, {during} while Redis was down, "
        f"{total - before - during} after; {unchecked} admitted unchecked"
    )
    assert during > 0 and total - before - during > 0
    assert unchecked > 0  # the outage really happened under load

    await fake.wait_idle()
    assert len(fake.records) == total
    assert all(r["status"] == 200 and r["completed"] for r in fake.records)
    expected = sum(independent_cost(r) for r in fake.records)

    store = open_store(store_url)
    await store.open()
    journal_dir = tmp_path / "journal"
    try:

        async def replayed() -> bool:
            state = await store.budget_state("all:total")
            return state == BudgetState(expected, 0) and not journal_files(journal_dir)

        try:
            await wait_until(replayed, 15, "the journals to be replayed")
        except AssertionError:
            state = await store.budget_state("all:total")
            raise AssertionError(
                f"Redis {state} != expected spent {expected}; journal files "
                f"{journal_files(journal_dir)}\n{logs}"
            ) from None
        records = await store.ledger_records()
        assert len(records) == total  # the journaled ledger records are back, once each
        assert sum(r.cost_nanos for r in records) == expected
        assert all(r.status == 200 and r.exact for r in records)
        # Exactly once: two more replay rounds (one a second) change nothing.
        await asyncio.sleep(2.5)
        assert await store.budget_state("all:total") == BudgetState(expected, 0)
        assert len(await store.ledger_records()) == total
    finally:
        await store.close()
    unchecked_metric = lost_metric = 0.0
    for replica in group:  # no settle or ledger record was dropped
        assert "is lost" not in replica.log(None)
        assert "no journal took it" not in replica.log(None)
        async with aiohttp.ClientSession() as s, s.get(f"{replica.url}/metrics") as resp:
            fams = {f.name: f for f in text_string_to_metric_families(await resp.text())}
        unchecked_metric += fams["metergate_budget_unchecked_requests"].samples[0].value
        lost_metric += fams["metergate_budget_settles_lost"].samples[0].value
    # What the operator sees: every request admitted unchecked is counted, none lost.
    assert (unchecked_metric, lost_metric) == (unchecked, 0)


async def test_fail_closed_refuses_with_503_while_redis_is_down(
    own_redis: RedisServer, fake: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await make_proxy(
        {"budgets": [ALL], "on_store_error": "fail_closed", "journal_dir": str(tmp_path / "j")},
        store=f"{own_redis.url}/0?namespace={namespace()}",
    )
    oa, an = proxy.openai(), proxy.anthropic()
    try:
        await oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
        assert await readyz(proxy.url) == (200, "ready")
        own_redis.kill()
        fake.reset()
        # Every budgeted request would be refused: the replica is not ready.
        assert await readyz(proxy.url) == (503, "unavailable")

        with pytest.raises(openai.APIStatusError) as oerr:
            await oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
        assert oerr.value.status_code == 503
        assert oerr.value.code == "store_unavailable"
        body: Any = oerr.value.body
        assert body["type"] == "api_error" and "budget store is unavailable" in body["message"]

        with pytest.raises(anthropic.APIStatusError) as aerr:
            await an.messages.create(
                model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        assert aerr.value.status_code == 503
        raw = aerr.value.response.json()
        assert raw["type"] == "error" and raw["error"]["type"] == "overloaded_error"
        assert "budget store is unavailable" in raw["error"]["message"]
        assert not fake.records  # a refused request reaches no upstream

        await asyncio.to_thread(own_redis.start)
        completion = await oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
        assert completion.usage is not None
        assert await readyz(proxy.url) == (200, "ready")
    finally:
        await oa.close()
        await an.close()


async def test_readyz_stays_up_degraded_under_fail_open(
    own_redis: RedisServer, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Under fail_open a replica serves without its store, so a load balancer must not
    take it out: /readyz answers 200 ``degraded`` and says the store is unreachable."""
    proxy = await make_proxy(
        {"budgets": [ALL], "journal_dir": str(tmp_path / "j")},
        store=f"{own_redis.url}/0?namespace={namespace()}",
    )
    assert await readyz(proxy.url) == (200, "ready")
    own_redis.kill()
    assert await readyz(proxy.url) == (200, "degraded")
    await asyncio.to_thread(own_redis.start)
    assert await readyz(proxy.url) == (200, "ready")


async def readyz(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/readyz") as r:
        return r.status, (await r.json())["status"]


class _Answers:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> int:
        return self.count


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_a_paused_redis_does_not_stall_requests(
    policy: str, own_redis: RedisServer, fake: FakeUpstream, make_proxy: ProxyFactory,
    tmp_path: Path,
) -> None:  # fmt: skip
    """``CLIENT PAUSE`` (sent on a connection of its own) makes Redis hold every
    client's command: a slow store, not a dead one. Requests made meanwhile are answered
    (200 under fail_open, 503 under fail_closed) while Redis is *still* paused, so none of
    them waited for the store to come back. No latency is asserted (bench/ measures
    speed); the pause simply outlasts the requests by far. After the pause the journaled
    charges of fail_open reach Redis, and the proxy shuts down cleanly."""
    proxy = await make_proxy(
        {
            "budgets": [ALL],
            "on_store_error": policy,
            "store_timeout_ms": 50,
            "journal_dir": str(tmp_path / "j"),
        },
        store=f"{own_redis.url}/0?namespace={namespace()}",
    )
    client = proxy.openai()

    async def call() -> int:
        try:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    # A raw connection of its own: a redis-py client may open a fresh connection for
    # UNPAUSE, whose handshake the pause would hold. Redis 7 holds UNPAUSE itself too,
    # so the pause is short and the UNPAUSE at the end returns when it is over.
    pauser = socket.create_connection(("127.0.0.1", own_redis.port), timeout=30)
    try:
        assert [await call() for _ in range(5)] == [200] * 5  # also warms the connections
        _redis_inline(pauser, "CLIENT PAUSE 10000 ALL")
        # A wait for the store fails here, before the pause ends: every answer below
        # is given while Redis is still paused (they take about a second).
        async with asyncio.timeout(8):
            during = [await call() for _ in range(8)]
            during += await asyncio.gather(*(call() for _ in range(8)))
    finally:
        _redis_inline(pauser, "CLIENT UNPAUSE")
        pauser.close()
        await client.close()
    want = 200 if policy == "fail_open" else 503
    assert during == [want] * 16
    if policy == "fail_open":
        # Every charge, the 16 journaled ones included, reaches Redis once it answers.
        await fake.wait_idle()
        expected = sum(independent_cost(r) for r in fake.records)

        async def replayed() -> bool:
            return await proxy.store.budget_state("all:total") == BudgetState(expected, 0)

        await wait_until(replayed, 20, "the journaled charges to be replayed")


def _redis_inline(conn: socket.socket, command: str) -> None:
    """Send one inline command and require its ``+OK``."""
    conn.sendall(command.encode() + b"\r\n")
    assert conn.recv(64).startswith(b"+OK"), command


async def test_a_store_that_keeps_answering_a_queue_is_waited_for() -> None:
    answers, lock = _Answers(), asyncio.Lock()

    async def call(i: int) -> int:
        async with lock:  # one at a time, 10 ms each: the last waits about 300 ms
            await asyncio.sleep(0.01)
            answers.count += 1
            return i

    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(wait_for_store(call(i), 0.05, answers=answers) for i in range(30))
    )
    assert results == list(range(30))
    assert time.perf_counter() - t0 > 0.2  # well past the 50 ms timeout, and no timeout


async def test_a_silent_store_times_out_after_about_the_timeout() -> None:
    cancelled = asyncio.Event()

    async def hangs() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    t0 = time.perf_counter()
    with pytest.raises(TimeoutError):
        await wait_for_store(hangs(), 0.05, answers=_Answers())
    assert time.perf_counter() - t0 < 0.5
    assert cancelled.is_set()  # the abandoned call does not linger


async def test_time_the_event_loop_spends_elsewhere_is_not_the_stores() -> None:
    loop = asyncio.get_running_loop()

    def burn() -> None:  # a burst of request handling: 150 ms of CPU on the loop
        end = time.perf_counter() + 0.15
        while time.perf_counter() < end:
            pass

    async def answers_after_the_burst() -> str:
        await asyncio.sleep(0.06)
        return "ok"

    loop.call_later(0.005, burn)
    assert await wait_for_store(answers_after_the_burst(), 0.05, answers=_Answers()) == "ok"


async def test_a_store_busy_with_others_is_given_up_on_at_the_max_wait() -> None:
    answers = _Answers()

    async def others() -> None:
        while True:
            await asyncio.sleep(0.01)
            answers.count += 1

    busy = asyncio.create_task(others())
    try:
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError):
            await wait_for_store(asyncio.sleep(30), 0.05, answers=answers, max_wait_s=0.3)
        assert 0.25 < time.perf_counter() - t0 < 1.0
    finally:
        busy.cancel()


async def test_cancelling_the_caller_cancels_the_store_call() -> None:
    cancelled = asyncio.Event()

    async def hangs() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    waiter = asyncio.create_task(wait_for_store(hangs(), 10, answers=_Answers()))
    await asyncio.sleep(0.02)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert cancelled.is_set()
