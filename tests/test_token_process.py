"""The proxy's token counter: counts in a child process, exactly as in-process tiktoken
counts, and survives the child's death."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest

from proxy.token_process import ProcessTokenCounter
from proxy.tokens import TokenCounter

TEXTS = [
    "",
    "hello world",
    "¿Qué tal? 你好 🙂 " * 50,
    "<|endoftext|> is plain text here",
    "x" * 70_000,
]
MODELS = ["gpt-4o-mini", "gpt-4-turbo", "claude-sonnet-4-5", "no-such-model"]


@pytest.fixture
async def counter() -> AsyncIterator[ProcessTokenCounter]:
    c = ProcessTokenCounter()
    c.check_available()
    try:
        yield c
    finally:
        await asyncio.to_thread(c.close)


async def test_counts_in_the_child_equal_counts_in_process(counter: ProcessTokenCounter) -> None:
    local = TokenCounter()
    try:
        for model in MODELS:
            for text in TEXTS:
                assert await counter.count_async(text, model) == local.count(text, model)
    finally:
        local.close()
    assert counter.child_pid is not None and counter.child_pid != os.getpid()


async def test_a_dead_child_is_replaced(counter: ProcessTokenCounter) -> None:
    assert await counter.count_async("hello world", "gpt-4o") == 2
    first = counter.child_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)  # the child this test's counter started
    assert await counter.count_async("hello world", "gpt-4o") == 2
    assert counter.child_pid not in (None, first)


async def test_concurrent_counts_are_all_answered(counter: ProcessTokenCounter) -> None:
    texts = [f"request number {i} " * (i + 1) for i in range(40)]
    counts = await asyncio.gather(*(counter.count_async(t, "gpt-4o-mini") for t in texts))
    local = TokenCounter()
    try:
        assert counts == [local.count(t, "gpt-4o-mini") for t in texts]
    finally:
        local.close()


async def test_closed_counter_refuses_and_its_child_ends() -> None:
    c = ProcessTokenCounter()
    assert await c.count_async("hi", "gpt-4o") == 1
    pid = c.child_pid
    assert pid is not None
    await asyncio.to_thread(c.close)
    with pytest.raises(RuntimeError, match="closed"):
        await c.count_async("hi", "gpt-4o")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
