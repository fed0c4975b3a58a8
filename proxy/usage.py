"""Token usage of one request, normalised across providers.

Every count is a *total of its kind* with subsets named explicitly, so that pricing
can charge each token exactly once:

    input        all prompt tokens, including the ones read from or written to a cache
    cached_input the part of ``input`` read from the provider's prompt cache
    cache_write  the part of ``input`` written to the cache (Anthropic), all TTLs
    cache_write_1h  the part of ``cache_write`` written with the 1-hour TTL
    output       all generated tokens, including reasoning/thinking tokens
    reasoning    the part of ``output`` spent on reasoning

``None`` means "not reported"; ``0`` means the provider said zero. ``exact`` is True
only when every number came from the provider's own usage report.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

TOKEN_KINDS = ("input", "cached_input", "cache_write", "output", "reasoning")


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens used by one request (see the module docstring for the units)."""

    input: int | None = None
    output: int | None = None
    cached_input: int | None = None
    cache_write: int | None = None
    cache_write_1h: int | None = None
    reasoning: int | None = None
    exact: bool = True

    @property
    def complete(self) -> bool:
        """True when both the input and the output count are known."""
        return self.input is not None and self.output is not None

    def merge(self, other: Usage) -> Usage:
        """Combine two partial reports, keeping the larger value of each field.

        Providers report usage cumulatively (Anthropic's ``message_start`` and then
        ``message_delta``), so the latest report is never smaller than an earlier one;
        taking the maximum makes the merge order-independent.
        """

        def pick(a: int | None, b: int | None) -> int | None:
            if a is None:
                return b
            if b is None:
                return a
            return max(a, b)

        return Usage(
            input=pick(self.input, other.input),
            output=pick(self.output, other.output),
            cached_input=pick(self.cached_input, other.cached_input),
            cache_write=pick(self.cache_write, other.cache_write),
            cache_write_1h=pick(self.cache_write_1h, other.cache_write_1h),
            reasoning=pick(self.reasoning, other.reasoning),
            exact=self.exact and other.exact,
        )

    def estimated(self) -> Usage:
        """The same counts, flagged as estimated rather than provider-reported."""
        return replace(self, exact=False)

    def tokens_by_kind(self) -> dict[str, int]:
        """Counts per metric kind (``TOKEN_KINDS``), with ``None`` read as zero."""
        return {
            "input": self.input or 0,
            "cached_input": self.cached_input or 0,
            "cache_write": self.cache_write or 0,
            "output": self.output or 0,
            "reasoning": self.reasoning or 0,
        }


ZERO = Usage(input=0, output=0, cached_input=0, cache_write=0, cache_write_1h=0, reasoning=0)
