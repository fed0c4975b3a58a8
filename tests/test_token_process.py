"""The proxy's token counter: counts in a child process, exactly as in-process tiktoken
counts, and survives the child's death."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.token_process import ProcessTokenCounter
from proxy.tokens import TokenCounter, TokenizerUnavailable

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


async def test_a_cancelled_count_leaves_the_next_answers_in_order(
    counter: ProcessTokenCounter,
) -> None:
    big = "many words here " * 200_000  # 3.2 MB: many pipe buffers, written as it drains
    first = asyncio.ensure_future(counter.count_async(big, "gpt-4o-mini"))
    await asyncio.sleep(0)
    first.cancel()
    assert await counter.count_async("hello world", "gpt-4o") == 2
    assert await counter.count_async("one two three", "claude-sonnet-4-5") == 3


async def test_a_missing_vocabulary_fails_the_count_not_the_child(tmp_path: Path) -> None:
    c = ProcessTokenCounter(vocab_dir=tmp_path)  # an empty directory: no vocabulary
    try:
        with pytest.raises(TokenizerUnavailable, match="not found in"):
            await c.count_async("hello", "gpt-4o")
        pid = c.child_pid
        with pytest.raises(TokenizerUnavailable):
            await c.count_async("hello", "claude-sonnet-4-5")
        assert c.child_pid == pid  # the same child answered both
    finally:
        await asyncio.to_thread(c.close)


async def test_the_child_is_lean(counter: ProcessTokenCounter) -> None:
    """The child loads tiktoken and nothing of the proxy's server, CLI or store clients
    (multiprocessing's spawn re-imported the `metergate` entry point in it), and starts
    no helper process (multiprocessing's resource tracker)."""
    assert await counter.count_async("hello world", "gpt-4o") == 2
    pid = counter.child_pid
    assert pid is not None
    with open(f"/proc/{pid}/maps") as f:
        mapped = f.read()
    assert "tiktoken" in mapped
    for module in ("aiohttp", "yaml", "hiredis", "multidict", "uvloop", "prometheus"):
        assert module not in mapped, f"the token-counting child loaded {module}"
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        assert f.read().split() == []
    # and this process has no multiprocessing helper either
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        for kid in f.read().split():
            with open(f"/proc/{kid}/cmdline", "rb") as cmd:
                assert b"multiprocessing" not in cmd.read()
