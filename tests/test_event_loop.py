"""Tokenising never stalls other requests.

A request with a ~1 MB prompt whose usage the upstream never reports (a stream cut
short; a 200 whose body is not JSON) makes the proxy count the prompt with tiktoken,
which takes 100+ ms for 1 MB. While that runs, small requests keep flowing and a ticker
task measures how late the event loop wakes it. The proxy runs in this process, on this
loop, so any synchronous counting (or parsing, or copying) of the big body would show up
as lag.

The machine is shared and has two cores, so a tick can also be late because the OS ran
something else. The ticker therefore also measures the CPU time the loop's thread spent
during each tick: a stall caused by work on the loop consumes that thread's CPU, a
preemption does not. The strict bound (20 ms) is on that; the wall-clock lag gets a
bound scaled to how long one synchronous count of the prompt takes on this machine now.

The garbage collector is kept out of the measurement: a full collection of this test
process (pytest, both SDKs, two vocabularies, the prompts) takes 100+ ms whenever it
happens to fall due, which says nothing about the proxy's request path. Objects that
exist before the measurement are frozen (``gc.freeze``), so a collection that does run
only scans what the requests allocate.
"""

from __future__ import annotations

import asyncio
import gc
import random
import string
import time

import aiohttp
import orjson

from proxy.providers.openai import chat_framing_tokens
from proxy.tokens import TokenCounter
from tests.conftest import KEY_A, ProxyFactory, RunningProxy
from tests.e2e_support import ledger_for, raw_post
from tests.fake_upstream import FakeUpstream

TICK_S = 0.002
MAX_LAG_S = 0.020
PROMPT_BYTES = 1_000_000


def _prompt(seed: int) -> str:
    """~1 MB of varied words (repetitive text would tokenise unrealistically fast)."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 11))) for _ in range(5000)
    ]
    parts: list[str] = []
    size = 0
    while size < PROMPT_BYTES:
        word = rng.choice(words)
        parts.append(word)
        size += len(word) + 1
    return " ".join(parts)


class Ticker:
    """Measures event-loop lag: how late a short sleep wakes up (``lags``), and how much
    CPU the loop's thread used meanwhile (``busy``)."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.busy: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(TICK_S)
            self.lags.append(time.perf_counter() - t - TICK_S)
            self.busy.append(time.thread_time() - cpu)

    def clear(self) -> None:
        self.lags.clear()
        self.busy.clear()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


async def test_big_prompt_estimate_does_not_stall_the_loop(
    make_proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    proxy = await make_proxy()
    chat_prompt, claude_prompt = _prompt(1), _prompt(2)
    # What the proxy should arrive at, counted independently (and off the loop).
    counter = TokenCounter()
    sync_started = time.perf_counter()
    expected_chat = await asyncio.to_thread(counter.count, chat_prompt, "gpt-4o-mini")
    expected_chat += chat_framing_tokens(1)  # the one message's framing, and the priming
    one_count_s = time.perf_counter() - sync_started
    expected_claude = await asyncio.to_thread(counter.count, claude_prompt, "claude-haiku-4-5")
    counter.close()

    big_chat = orjson.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": chat_prompt}],
        }
    )
    big_claude = orjson.dumps(
        {
            "model": "claude-haiku-4-5",
            "max_tokens": 100,
            "messages": [{"role": "user", "content": claude_prompt}],
        }
    )
    assert len(big_chat) > PROMPT_BYTES and len(big_claude) > PROMPT_BYTES

    gc.collect()
    gc.freeze()
    try:
        await _measure(proxy, big_chat, big_claude, expected_chat, expected_claude, one_count_s)
    finally:
        gc.unfreeze()


async def _measure(
    proxy: RunningProxy,
    big_chat: bytes,
    big_claude: bytes,
    expected_chat: int,
    expected_claude: int,
    one_count_s: float,
) -> None:
    small = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    auth = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}
    ticker = Ticker()
    ticker.start()
    # Let the ticker settle, then measure only while the work runs.
    await asyncio.sleep(0.05)
    ticker.clear()

    async def big(path: str, body: bytes, knobs: dict[str, str]) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(proxy.url + path, data=body, headers={**auth, **knobs}) as resp,
        ):
            try:
                await resp.read()
            except aiohttp.ClientPayloadError:
                pass  # the cut stream: broken as the upstream broke it
            return resp.status, resp.headers.get("x-request-id") or resp.headers["request-id"]

    big_tasks = [
        asyncio.create_task(big("/openai/v1/chat/completions", big_chat, {"X-Fake-Fault": "cut"})),
        asyncio.create_task(
            big("/anthropic/v1/messages", big_claude, {"X-Fake-Fault": "html:200"})
        ),
    ]
    small_latencies: list[float] = []

    async def small_traffic() -> None:
        while not all(t.done() for t in big_tasks):
            t0 = time.perf_counter()
            status, _, _ = await raw_post(proxy.url + "/openai/v1/chat/completions", small, auth)
            assert status == 200
            small_latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(small_traffic() for _ in range(4)), *big_tasks)
    await ticker.stop()

    (chat_status, chat_id), (claude_status, claude_id) = [t.result() for t in big_tasks]
    assert chat_status == 200 and claude_status == 200
    chat_led = await ledger_for(proxy, chat_id)
    claude_led = await ledger_for(proxy, claude_id)
    # The estimates were made, by tiktoken, of the whole prompt.
    assert not chat_led.exact and chat_led.input_tokens == expected_chat
    assert not claude_led.exact and claude_led.input_tokens == expected_claude
    assert len(small_latencies) >= 8
    lags, busy = sorted(ticker.lags), sorted(ticker.busy)
    report = (
        f"loop busy at most {busy[-1] * 1000:.1f} ms in one tick, late at most "
        f"{lags[-1] * 1000:.1f} ms (p50 {lags[len(lags) // 2] * 1000:.1f} ms); one "
        f"synchronous count of the prompt takes {one_count_s * 1000:.0f} ms here"
    )
    assert busy[-1] < MAX_LAG_S, report
    assert lags[len(lags) // 2] < MAX_LAG_S, report
    assert lags[-1] < max(MAX_LAG_S, one_count_s / 2), report
    assert len(lags) > 20, report
