"""Price catalog: loading, resolution, and integer cost arithmetic."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import pytest

from proxy.pricing import (
    Catalog,
    Price,
    PriceCatalogError,
    Rates,
    cost_nanos,
    describe,
)
from proxy.usage import Usage

REPO = Path(__file__).resolve().parent.parent
M = 1_000_000  # tokens per rate unit
NANO = 1_000_000_000  # nano-USD per USD


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def one_model(**rates: Any) -> Catalog:
    """A catalog holding a single model "m" with the given USD-per-1M rates."""
    entry = {"source": "https://example.test/pricing", "effective": "2025-01-01", **rates}
    return Catalog.from_mapping({"models": {"m": entry}})


def price_of(catalog: Catalog, model: str) -> Price:
    price = catalog.resolve(model)
    assert price is not None, model
    return price


# ───────────────────────────── resolution ─────────────────────────────


@pytest.mark.parametrize(
    ("asked", "canonical"),
    [
        # exact names
        ("gpt-4o", "gpt-4o"),
        ("gpt-5-nano", "gpt-5-nano"),
        ("claude-opus-4-6", "claude-opus-4-6"),
        ("text-embedding-3-small", "text-embedding-3-small"),
        # case and whitespace do not matter
        ("  GPT-4o ", "gpt-4o"),
        # aliases: dated snapshots with the same price
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-turbo-preview", "gpt-4-turbo"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        # a dated snapshot with its own price is its own entry
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
        ("gpt-3.5-turbo-1106", "gpt-3.5-turbo-1106"),
        # dated snapshot suffix stripped for snapshots the catalog does not list
        ("gpt-5-2026-01-01", "gpt-5"),
        ("o3-2025-04-16", "o3"),
        ("gpt-4o-mini-2099-12-31", "gpt-4o-mini"),
        # Anthropic: dated ids canonical, undated and -latest ids as aliases
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20250929"),
        ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929"),
        ("claude-sonnet-4-0", "claude-sonnet-4-20250514"),
        ("claude-opus-4-1", "claude-opus-4-1-20250805"),
        ("claude-haiku-4-5", "claude-haiku-4-5-20251001"),
        ("claude-3-5-sonnet-20240620", "claude-3-5-sonnet-20241022"),
        ("claude-3-5-sonnet-latest", "claude-3-5-sonnet-20241022"),
        ("claude-3-7-sonnet-latest", "claude-3-7-sonnet-20250219"),
        ("claude-opus-4-5-20991231", "claude-opus-4-5-20251101"),  # future snapshot
        # -latest stripped when no explicit entry exists
        ("claude-haiku-4-5-latest", "claude-haiku-4-5-20251001"),
        # an explicit -latest entry wins over stripping
        ("gpt-5-chat-latest", "gpt-5-chat-latest"),
    ],
)
def test_resolves_to_canonical(catalog: Catalog, asked: str, canonical: str) -> None:
    price = price_of(catalog, asked)
    assert price.model == canonical
    assert not price.fine_tune


@pytest.mark.parametrize(
    ("asked", "base", "input_usd", "output_usd"),
    [
        (
            "ft:gpt-4o-mini-2024-07-18:my-org:custom:abc123",
            "gpt-4o-mini-2024-07-18",
            "0.30",
            "1.20",
        ),
        ("ft:gpt-4o-2024-08-06:acme::9xYz", "gpt-4o-2024-08-06", "3.75", "15"),
        ("ft:gpt-4.1-2025-04-14:acme:v2:id", "gpt-4.1-2025-04-14", "3", "12"),
        ("ft:gpt-4.1-mini-2025-04-14:acme::id", "gpt-4.1-mini-2025-04-14", "0.80", "3.20"),
        ("ft:gpt-4.1-nano-2025-04-14:acme::id", "gpt-4.1-nano-2025-04-14", "0.20", "0.80"),
        ("ft:gpt-3.5-turbo-0125:acme::id", "gpt-3.5-turbo", "3", "6"),
        ("ft:gpt-3.5-turbo-1106:acme::id", "gpt-3.5-turbo", "3", "6"),
        ("ft:davinci-002:acme::id", "davinci-002", "12", "12"),
        # base named by an undated alias: resolved through the base model's own entry
        ("ft:gpt-4o-mini:acme::id", "gpt-4o-mini-2024-07-18", "0.30", "1.20"),
    ],
)
def test_fine_tunes_use_fine_tune_rates(
    catalog: Catalog, asked: str, base: str, input_usd: str, output_usd: str
) -> None:
    price = price_of(catalog, asked)
    assert price.fine_tune
    assert price.model == f"ft:{base}"
    assert price.rates.input == usd(input_usd)
    assert price.rates.output == usd(output_usd)


@pytest.mark.parametrize(
    "asked",
    [
        "",
        "gpt-9",
        "llama-3-70b",
        "claude-2",
        "gpt-4o-mini-fast",
        "ft:",
        "ft:llama-3:acme::id",
        # 2024-05-13 cannot be fine-tuned: no price rather than the base model's price
        "ft:gpt-4o-2024-05-13:acme::id",
    ],
)
def test_unknown_models_resolve_to_none(catalog: Catalog, asked: str) -> None:
    assert catalog.resolve(asked) is None


def test_resolution_is_cached_and_bounded() -> None:
    catalog = Catalog.from_mapping(
        {"models": {"m": {"input": 1, "output": 2, "source": "s", "effective": "2025-01-01"}}},
        cache_size=3,
    )
    first = catalog.resolve("m-2025-01-01")
    assert first is catalog.resolve("m-2025-01-01")
    for i in range(10):
        assert catalog.resolve(f"unknown-{i}") is None
    assert len(catalog._cache) <= 3
    assert catalog.resolve("m") is first


def usd(amount: str) -> int:
    """USD per 1M tokens as nano-USD per 1M tokens, for expected values."""
    from decimal import Decimal

    return int(Decimal(amount) * NANO)


# ───────────────────────────── cost arithmetic ─────────────────────────────


@pytest.mark.parametrize(
    ("model", "usage", "expected_nanos"),
    [
        # $2.50 + $10 per 1M in/out
        ("gpt-4o", Usage(input=M, output=M), 12_500_000_000),
        # cached input at half price: 600k uncached x $2.50 + 400k x $1.25 + 0 out
        ("gpt-4o", Usage(input=M, output=0, cached_input=400_000), 2_000_000_000),
        # cached input at 10% on gpt-5-nano: 1k x 0.05 + 9k x 0.005 + 1k x 0.40
        ("gpt-5-nano", Usage(input=10_000, output=1_000, cached_input=9_000), 495_000),
        # reasoning tokens are part of output, billed at the output rate
        ("o4-mini", Usage(input=1_000, output=5_000, reasoning=4_000), 23_100_000),
        # nothing reported is zero, never an error
        ("gpt-4o", Usage(), 0),
        # 1 token at $0.005/M = 5 nano exactly
        ("gpt-5-nano", Usage(input=1, output=0, cached_input=1), 5),
    ],
)
def test_cost(catalog: Catalog, model: str, usage: Usage, expected_nanos: int) -> None:
    assert cost_nanos(price_of(catalog, model), usage) == expected_nanos


def test_anthropic_cache_reads_and_writes_each_at_their_own_rate(catalog: Catalog) -> None:
    # Sonnet 4.5: $3 input, $0.30 cache hit, $3.75 5m write, $6 1h write, $15 output.
    usage = Usage(
        input=10_000,  # includes the 4,000 read and the 3,000 written
        cached_input=4_000,
        cache_write=3_000,
        cache_write_1h=1_000,  # part of the 3,000 written
        output=2_000,
        reasoning=500,  # part of output
    )
    expected_usd = (
        3_000 * 3.00  # uncached input
        + 4_000 * 0.30
        + 2_000 * 3.75  # 5-minute writes
        + 1_000 * 6.00  # 1-hour writes
        + 2_000 * 15.00  # output, reasoning included, same rate
    ) / M
    assert expected_usd == pytest.approx(0.0537)
    assert cost_nanos(price_of(catalog, "claude-sonnet-4-5"), usage) == 53_700_000


@pytest.mark.parametrize(
    ("prompt_tokens", "expected_nanos"),
    [
        # at the threshold: standard tier, 200k x $3 + 1k x $15
        (200_000, 615_000_000),
        # one token over: the whole request at $6 / $22.50
        (200_001, 1_200_006_000 + 22_500_000),
    ],
)
def test_long_context_tier_starts_above_threshold(
    catalog: Catalog, prompt_tokens: int, expected_nanos: int
) -> None:
    price = price_of(catalog, "claude-sonnet-4-20250514")
    assert cost_nanos(price, Usage(input=prompt_tokens, output=1_000)) == expected_nanos


def test_long_context_tier_applies_to_every_kind(catalog: Catalog) -> None:
    usage = Usage(
        input=300_000,
        cached_input=100_000,
        cache_write=50_000,
        cache_write_1h=10_000,
        output=1_000,
    )
    # 150k x $6 + 100k x $0.60 + 40k x $7.50 + 10k x $12 + 1k x $22.50 = $1.4025
    assert cost_nanos(price_of(catalog, "claude-sonnet-4-5"), usage) == 1_402_500_000


def test_reasoning_rate_of_its_own() -> None:
    price = price_of(one_model(input=1, output=4, reasoning=2), "m")
    # 1k visible output x $4 + 3k reasoning x $2 = $0.01 = 10,000,000 nano
    assert cost_nanos(price, Usage(input=0, output=4_000, reasoning=3_000)) == 10_000_000


@pytest.mark.parametrize(
    ("rate_usd", "usage", "expected_nanos"),
    [
        ("0.075", Usage(input=1, output=0), 75),  # exact: no rounding needed
        ("0.0375", Usage(input=1, output=0), 38),  # 37.5 rounds UP
        ("0.000001", Usage(input=1, output=0), 1),  # 0.001 nano rounds up to 1
        ("0.0375", Usage(input=0, output=0), 0),  # zero stays zero
    ],
)
def test_rounds_up_once(rate_usd: str, usage: Usage, expected_nanos: int) -> None:
    price = price_of(one_model(input=rate_usd, output=rate_usd), "m")
    assert cost_nanos(price, usage) == expected_nanos


def test_sums_kinds_before_rounding() -> None:
    # Input and output each cost 37.5 nano: rounding each would give 38 + 38 = 76,
    # rounding the sum once gives the invoice's 75.
    price = price_of(one_model(input="0.0375", output="0.0375"), "m")
    per_kind = cost_nanos(price, Usage(input=1, output=0)) + cost_nanos(
        price, Usage(input=0, output=1)
    )
    assert per_kind == 76
    assert cost_nanos(price, Usage(input=1, output=1)) == 75


@pytest.mark.parametrize(
    ("usage", "expected_nanos"),
    [
        # cached + written exceed input (an adapter that forgot to add them): clamp at 0
        (Usage(input=10, cached_input=20, output=0), 20 * 100),
        # reasoning reported above output: never a negative visible count
        (Usage(input=0, output=5, reasoning=10), 10 * 1_000),
        # 1h writes without the total: the 1h part is the whole write
        (Usage(input=10, cache_write_1h=10, output=0), 10 * 3_000),
    ],
)
def test_inconsistent_reports_never_go_negative(usage: Usage, expected_nanos: int) -> None:
    price = price_of(
        one_model(input=1, cached_input="0.1", cache_write=2, cache_write_1h=3, output=1), "m"
    )
    assert cost_nanos(price, usage) == expected_nanos


# ───────────────────────────── loading ─────────────────────────────


def test_rates_default_to_the_related_kind() -> None:
    rates = price_of(one_model(input=2, output=8), "m").rates
    assert rates == Rates(
        input=2 * NANO,
        output=8 * NANO,
        cached_input=2 * NANO,
        cache_write=2 * NANO,
        cache_write_1h=2 * NANO,
        reasoning=8 * NANO,
    )
    assert Rates.of(1, 2, cache_write=5).cache_write_1h == 5


def test_yaml_numbers_never_pass_through_float(tmp_path: Path) -> None:
    override = tmp_path / "prices.yaml"
    override.write_text(
        "models:\n"
        "  exact:\n"
        "    input: 0.075\n"  # a bare YAML float
        "    output: 1.000000001\n"  # float() would give 1000000000.9999999 nano
        "    cached_input: 1_000.5\n"
        "    source: https://example.test\n"
        "    effective: 2025-01-01\n"  # a YAML date, kept as its ISO text
    )
    price = price_of(Catalog.load(override), "exact")
    assert price.rates.input == 75_000_000
    assert price.rates.output == 1_000_000_001
    assert price.rates.cached_input == 1_000_500_000_000
    assert price.effective == "2025-01-01"


def test_override_file_replaces_and_adds(tmp_path: Path) -> None:
    override = tmp_path / "mine.yaml"
    override.write_text(
        "models:\n"
        "  gpt-4o:\n"
        "    input: 3\n"
        "    output: 12\n"
        "    source: https://example.test/negotiated\n"
        "    effective: 2026-01-01\n"
        "  in-house-model:\n"
        "    input: 0.5\n"
        "    output: 1\n"
        "    aliases: [in-house-model-v2]\n"
        "    source: internal\n"
        "    effective: 2026-01-01\n"
    )
    bundled = Catalog.load()
    catalog = Catalog.load(override)
    replaced = price_of(catalog, "gpt-4o-2024-08-06")  # bundled aliases are kept
    assert replaced.model == "gpt-4o"
    assert (replaced.rates.input, replaced.rates.output) == (3 * NANO, 12 * NANO)
    assert replaced.rates.cached_input == 3 * NANO  # the override's own default
    assert replaced.source == "https://example.test/negotiated"
    assert price_of(catalog, "in-house-model-v2").model == "in-house-model"
    # everything else is untouched
    assert price_of(catalog, "claude-sonnet-4-5") == price_of(bundled, "claude-sonnet-4-5")
    assert len(catalog.models()) == len(bundled.models()) + 1


def test_override_entry_named_like_an_alias_wins(tmp_path: Path) -> None:
    override = tmp_path / "mine.yaml"
    override.write_text(
        "models:\n  gpt-4o-2024-11-20: {input: 9, output: 9, source: x, effective: 2026-01-01}\n"
    )
    catalog = Catalog.load(override)
    assert price_of(catalog, "gpt-4o-2024-11-20").rates.input == 9 * NANO
    assert price_of(catalog, "gpt-4o-2024-08-06").model == "gpt-4o"


def test_missing_override_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PriceCatalogError, match=r"nope\.yaml"):
        Catalog.load(missing)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"input": "0.0000000001", "output": 1}, r"'gpt-x' field 'input'.*more than 9 decimal"),
        ({"input": 1, "output": "-2"}, r"'gpt-x' field 'output'.*non-negative"),
        ({"input": "ten", "output": 1}, r"'gpt-x' field 'input'.*not a number"),
        ({"input": True, "output": 1}, r"'gpt-x' field 'input'"),
        ({"input": "nan", "output": 1}, r"'gpt-x' field 'input'.*finite"),
        ({"output": 1}, r"'gpt-x'.*`input` is required"),
        ({"input": 1, "output": 1, "cache_read": 1}, r"'gpt-x'.*unknown field.*cache_read"),
        ({"input": 1, "output": 1, "effective": "May 2025"}, r"'gpt-x'.*ISO date"),
        ({"input": 1, "output": 1, "source": ""}, r"'gpt-x'.*`source` is required"),
        (
            {"input": 1, "output": 1, "long_context": {"input": 2, "output": 2}},
            r"'gpt-x' long_context.*threshold_input_tokens",
        ),
        ({"input": 1, "output": 1, "max_output_tokens": -1}, r"'gpt-x'.*max_output_tokens"),
    ],
)
def test_bad_entries_fail_with_the_model_named(entry: dict[str, Any], message: str) -> None:
    document = {"models": {"gpt-x": {"source": "s", "effective": "2025-01-01", **entry}}}
    with pytest.raises(PriceCatalogError, match=message):
        Catalog.from_mapping(document)


def test_alias_claimed_twice_fails() -> None:
    common = {"input": 1, "output": 1, "source": "s", "effective": "2025-01-01"}
    document = {"models": {"a": {**common, "aliases": ["x"]}, "b": {**common, "aliases": ["x"]}}}
    with pytest.raises(PriceCatalogError, match="alias 'x'"):
        Catalog.from_mapping(document)


def test_fallback_price_from_config() -> None:
    price = Catalog.fallback({"input": "10", "output": 30.5})
    assert (price.rates.input, price.rates.output) == (10 * NANO, 30_500_000_000)
    assert not price.confirmed
    assert price.model == "fallback"
    assert date.fromisoformat(price.effective)
    with pytest.raises(PriceCatalogError, match="fallback"):
        Catalog.fallback({"input": "10"})
    with pytest.raises(PriceCatalogError, match="unknown field"):
        Catalog.fallback({"input": 1, "output": 1, "cost": 3})


# ───────────────────────────── the bundled catalog ─────────────────────────────


def test_bundled_catalog_is_the_config_file() -> None:
    assert (REPO / "proxy/data/prices.yaml").resolve() == (REPO / "config/prices.yaml").resolve()


def test_every_bundled_entry_loads_with_provenance(catalog: Catalog) -> None:
    names = catalog.models()
    assert len(names) > 50
    for name in names:
        price = price_of(catalog, name)
        assert price.model == name
        assert price.source.startswith("https://"), name
        assert date.fromisoformat(price.effective) <= date(2026, 12, 31), name
        assert price.rates.input > 0, name
        if not price.confirmed:
            assert price.note, f"{name} is unconfirmed and must say why"
        for alias in price.aliases:
            asked = f"ft:{alias}:org::id" if price.fine_tune else alias
            assert price_of(catalog, asked) is price, alias


@pytest.mark.parametrize(
    "model",
    [
        "gpt-5",
        "gpt-5-mini",
        "gpt-5-nano",
        "gpt-5-chat-latest",
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4-turbo",
        "gpt-4",
        "gpt-3.5-turbo",
        "o1",
        "o1-mini",
        "o1-pro",
        "o3",
        "o3-mini",
        "o3-pro",
        "o4-mini",
        "text-embedding-3-small",
        "text-embedding-3-large",
        "text-embedding-ada-002",
        "davinci-002",
        "babbage-002",
        "claude-opus-4-0",
        "claude-opus-4-1",
        "claude-opus-4-5",
        "claude-sonnet-4-0",
        "claude-sonnet-4-5",
        "claude-haiku-4-5",
        "claude-3-7-sonnet-20250219",
        "claude-3-5-sonnet-20241022",
        "claude-3-5-haiku-20241022",
        "claude-3-haiku-20240307",
        "claude-3-opus-20240229",
    ],
)
def test_required_models_are_priced(catalog: Catalog, model: str) -> None:
    assert catalog.resolve(model) is not None


def test_anthropic_cache_rates_follow_the_published_multipliers(catalog: Catalog) -> None:
    # 5m write 1.25x, 1h write 2x, hit 0.1x input: a cheap check against typos. Claude 3
    # Haiku is the exception: its published $0.30 write and $0.03 hit are rounded.
    for name in catalog.models():
        price = price_of(catalog, name)
        if price.provider != "anthropic" or name == "claude-3-haiku-20240307":
            continue
        for rates in filter(None, (price.rates, getattr(price.long_context, "rates", None))):
            assert rates.cache_write * 4 == rates.input * 5, name
            assert rates.cache_write_1h == rates.input * 2, name
            assert rates.cached_input * 10 == rates.input, name


def test_describe_reports_resolution_rates_and_example(catalog: Catalog) -> None:
    text = describe(price_of(catalog, "gpt-4o-2024-08-06"), "gpt-4o-2024-08-06")
    assert "gpt-4o-2024-08-06 → gpt-4o" in text
    assert "alias of gpt-4o" in text
    assert "$2.50 / 1M tokens" in text
    assert "https://" in text
    assert "1,000 input + 1,000 output tokens = $0.0125" in text

    long = describe(price_of(catalog, "claude-sonnet-4-5"), "claude-sonnet-4-5")
    assert "above 200,000 input tokens" in long
    assert "$22.50 / 1M tokens" in long
    assert "cache write 1h" in long

    ft = describe(
        price_of(catalog, "ft:gpt-4o-mini-2024-07-18:o::x"), "ft:gpt-4o-mini-2024-07-18:o::x"
    )
    assert "fine-tune of gpt-4o-mini-2024-07-18" in ft
