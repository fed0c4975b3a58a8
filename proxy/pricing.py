"""Model prices, and the cost of one request's usage in integer nano-dollars.

Units and invariants
--------------------
The catalog (``config/prices.yaml``, bundled as ``proxy/data/prices.yaml``) states
every rate in USD per 1M tokens. At load each rate becomes an ``int`` of nano-dollars
(1e-9 USD) per 1M tokens, converted exactly through :class:`~decimal.Decimal` from the
YAML *text*: a YAML float such as ``0.075`` never passes through a binary float, and a
rate finer than one nano-dollar per 1M tokens (more than 9 decimals) is refused at load.

The cost of a request is then pure integer arithmetic::

    total = sum(tokens_of_kind * nano_usd_per_1M_of_kind)   # nano-USD x 1e6
    cost  = ceil(total / 1_000_000)                         # rounded up ONCE

Each token is charged exactly once, at the rate of its kind (see ``proxy.usage``):
uncached input, cached input, 5-minute cache write, 1-hour cache write, visible output,
reasoning. Rounding each kind separately would drift from the provider's invoice.

Resolution order (:meth:`Catalog.resolve`): exact name, alias, ``ft:`` fine-tune of the
base model, name without a dated snapshot suffix (``-YYYY-MM-DD`` or ``-YYYYMMDD``),
name without ``-latest``. Unknown models resolve to ``None``; what to do then (refuse,
or charge a configured fallback and alert) is the caller's policy, never a silent $0.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import date
from decimal import Decimal, InvalidOperation, localcontext
from importlib import resources
from pathlib import Path
from typing import Any, Final

import yaml

from proxy.usage import Usage

NANOS_PER_USD: Final = 1_000_000_000
TOKENS_PER_RATE_UNIT: Final = 1_000_000  # rates are "per 1M tokens"
DEFAULT_RESOLVE_CACHE_SIZE: Final = 4096
BUNDLED_CATALOG: Final = "data/prices.yaml"  # package data of ``proxy``
SCHEMA_VERSION: Final = 1

RATE_FIELDS: Final = (
    "input",
    "output",
    "cached_input",
    "cache_write",
    "cache_write_1h",
    "reasoning",
)
_ENTRY_FIELDS: Final = frozenset(
    (
        *RATE_FIELDS,
        *("provider", "source", "effective", "confirmed", "note", "aliases"),
        *("max_output_tokens", "context_window", "long_context"),
    )
)
_LONG_CONTEXT_FIELDS: Final = frozenset((*RATE_FIELDS, "threshold_input_tokens"))
# Dated snapshot suffixes: OpenAI "-2024-08-06", Anthropic "-20250929". Four-digit
# OpenAI suffixes ("-0613") are NOT stripped: several of those snapshots had their own
# price, so they are listed explicitly instead.
_SNAPSHOT_SUFFIX: Final = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$")
_LATEST_SUFFIX: Final = "-latest"
_FINE_TUNE_PREFIX: Final = "ft:"


class PriceCatalogError(ValueError):
    """The price catalog (bundled or override) is malformed; raised at load time."""


@dataclass(frozen=True, slots=True)
class Rates:
    """Rates of one price tier, each in integer nano-USD per 1M tokens."""

    input: int
    output: int
    cached_input: int
    cache_write: int
    cache_write_1h: int
    reasoning: int

    @classmethod
    def of(
        cls,
        input: int,
        output: int,
        *,
        cached_input: int | None = None,
        cache_write: int | None = None,
        cache_write_1h: int | None = None,
        reasoning: int | None = None,
    ) -> Rates:
        """Build rates with the catalog's defaults for the kinds a provider doesn't list.

        A provider without a cache discount charges cached tokens as input; without a
        separate 1-hour rate, 1-hour writes cost a 5-minute write; reasoning is output.
        """
        write = input if cache_write is None else cache_write
        return cls(
            input=input,
            output=output,
            cached_input=input if cached_input is None else cached_input,
            cache_write=write,
            cache_write_1h=write if cache_write_1h is None else cache_write_1h,
            reasoning=output if reasoning is None else reasoning,
        )


@dataclass(frozen=True, slots=True)
class LongContext:
    """A tier billed for the whole request once the prompt exceeds ``threshold`` tokens."""

    threshold: int
    rates: Rates


@dataclass(frozen=True, slots=True)
class Price:
    """The price of one model: rates, limits and provenance."""

    model: str  # canonical name; "ft:<base>" for fine-tunes
    rates: Rates
    long_context: LongContext | None
    max_output_tokens: int | None
    context_window: int | None
    source: str
    effective: str  # ISO date from which the rates apply
    confirmed: bool  # False: not seen on the provider's own page
    fine_tune: bool
    provider: str = ""
    note: str = ""
    aliases: tuple[str, ...] = ()

    def rates_for(self, usage: Usage) -> Rates:
        """The tier that applies to this usage (long-context when the prompt is over it)."""
        tier = self.long_context
        # Providers compare the whole prompt, cache reads and writes included, which is
        # exactly Usage.input; "exceeds" means strictly greater.
        if tier is not None and (usage.input or 0) > tier.threshold:
            return tier.rates
        return self.rates


def cost_nanos(price: Price, usage: Usage) -> int:
    """Cost of ``usage`` at ``price`` in nano-USD: every kind at its own rate, rounded up once.

    ``None`` counts are read as zero. Subsets are clamped so that an inconsistent report
    (cached + written > input, reasoning > output) never yields a negative count.
    """
    rates = price.rates_for(usage)
    prompt = max(usage.input or 0, 0)
    cached = max(usage.cached_input or 0, 0)
    written_1h = max(usage.cache_write_1h or 0, 0)
    written = max(usage.cache_write or 0, written_1h)  # the 1h part is inside cache_write
    uncached = max(prompt - cached - written, 0)
    output = max(usage.output or 0, 0)
    reasoning = max(usage.reasoning or 0, 0)
    visible = max(output - reasoning, 0)

    total = (
        uncached * rates.input
        + cached * rates.cached_input
        + (written - written_1h) * rates.cache_write
        + written_1h * rates.cache_write_1h
        + visible * rates.output
        + reasoning * rates.reasoning
    )
    # total is nano-USD x 1e6 (rates are per 1M tokens); ceil-divide exactly once.
    return (total + TOKENS_PER_RATE_UNIT - 1) // TOKENS_PER_RATE_UNIT


class Catalog:
    """Prices by model name, with alias, snapshot and fine-tune resolution.

    Build it with :meth:`load` (bundled catalog plus an optional override file) or
    :meth:`from_mapping` (tests). Resolutions are cached in a bounded dict because
    :meth:`resolve` runs on every request.
    """

    def __init__(
        self,
        prices: Mapping[str, Price],
        fine_tunes: Mapping[str, Price],
        *,
        cache_size: int = DEFAULT_RESOLVE_CACHE_SIZE,
    ) -> None:
        self._prices: dict[str, Price] = dict(prices)
        self._aliases = _alias_index(self._prices, "model")
        self._fine_tunes: dict[str, Price] = {
            name.removeprefix(_FINE_TUNE_PREFIX): p for name, p in fine_tunes.items()
        }
        self._ft_aliases = _alias_index(self._fine_tunes, "fine-tune base")
        # A fine-tune named after an undated or other snapshot of a listed base (say
        # "ft:gpt-4o-mini:...") is found through the base's own catalog resolution.
        self._ft_by_canonical: dict[str, Price] = {}
        for base, ft_price in self._fine_tunes.items():
            for name in (base, *ft_price.aliases):
                main = self._lookup(name)
                if main is not None:
                    self._ft_by_canonical.setdefault(main.model, ft_price)
        self._cache: dict[str, Price | None] = {}
        self._cache_size = max(cache_size, 1)

    @classmethod
    def load(
        cls,
        override_path: str | Path | None = None,
        *,
        cache_size: int = DEFAULT_RESOLVE_CACHE_SIZE,
    ) -> Catalog:
        """Load the bundled catalog, then let entries of ``override_path`` replace or add.

        An override entry replaces the bundled entry of the same name; when it has no
        ``aliases`` key it keeps the bundled aliases, since changing a price rarely
        means dropping the snapshot names that resolve to it.
        """
        text = resources.files("proxy").joinpath(BUNDLED_CATALOG).read_text("utf-8")
        prices, fine_tunes = _parse_document(_load_yaml(text, "bundled prices.yaml"), "bundled")
        if override_path is not None:
            path = Path(override_path)
            try:
                override_text = path.read_text("utf-8")
            except OSError as exc:
                raise PriceCatalogError(
                    f"Cannot read the price override file {path}: {exc.strerror}. "
                    "Fix the `prices:` setting or create the file."
                ) from exc
            doc = _load_yaml(override_text, str(path))
            extra, extra_ft = _parse_document(doc, str(path))
            _overlay(prices, extra, _raw_section(doc, "models"))
            _overlay(fine_tunes, extra_ft, _raw_section(doc, "fine_tunes"))
        return cls(prices, fine_tunes, cache_size=cache_size)

    @classmethod
    def from_mapping(
        cls,
        document: Mapping[str, Any],
        *,
        cache_size: int = DEFAULT_RESOLVE_CACHE_SIZE,
    ) -> Catalog:
        """A catalog from one already-parsed document with the YAML file's schema."""
        prices, fine_tunes = _parse_document(document, "mapping")
        return cls(prices, fine_tunes, cache_size=cache_size)

    @staticmethod
    def fallback(rates_usd: Mapping[str, Any], *, model: str = "fallback") -> Price:
        """A Price from a config dict such as ``{"input": "10", "output": "30"}`` (USD/1M).

        Used for the ``charge_fallback`` policy: it is never a provider price, so it is
        marked unconfirmed and its source says where it came from.
        """
        where = "the fallback price setting"
        unknown = set(rates_usd) - {*RATE_FIELDS, "max_output_tokens", "context_window"}
        if unknown:
            raise PriceCatalogError(
                f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                f"allowed are {', '.join(RATE_FIELDS)}, max_output_tokens, context_window."
            )
        return Price(
            model=model,
            rates=_parse_rates(rates_usd, where),
            long_context=None,
            max_output_tokens=_optional_int(rates_usd, "max_output_tokens", where),
            context_window=_optional_int(rates_usd, "context_window", where),
            source="configuration (fallback_price)",
            effective=date.today().isoformat(),
            confirmed=False,
            fine_tune=False,
            note="Fallback rate from configuration: the model has no catalog price.",
        )

    def models(self) -> tuple[str, ...]:
        """Canonical names of every priced model, fine-tunes as ``ft:<base>``, sorted."""
        names = [*self._prices, *(_FINE_TUNE_PREFIX + b for b in self._fine_tunes)]
        return tuple(sorted(names))

    def resolve(self, model: str) -> Price | None:
        """The price for ``model`` as a client names it, or ``None`` when it has none."""
        key = model.strip().lower()
        try:
            return self._cache[key]
        except KeyError:
            pass
        price = self._resolve_uncached(key)
        if len(self._cache) >= self._cache_size:
            # Evict the oldest entry: the cache exists for the few hot names, and a
            # client cycling through random names must not grow it without bound.
            del self._cache[next(iter(self._cache))]
        self._cache[key] = price
        return price

    def _resolve_uncached(self, key: str) -> Price | None:
        if key.startswith(_FINE_TUNE_PREFIX):
            return self._resolve_fine_tune(key)
        return self._lookup(key)

    def _lookup(self, key: str) -> Price | None:
        for candidate in _candidates(key):
            price = self._prices.get(candidate)
            if price is None and candidate in self._aliases:
                price = self._prices[self._aliases[candidate]]
            if price is not None:
                return price
        return None

    def _resolve_fine_tune(self, key: str) -> Price | None:
        # ft:<base>:<org>:<suffix>:<id>; the base is the second field.
        fields = key.split(":")
        base = fields[1] if len(fields) > 1 else ""
        if not base:
            return None
        for candidate in _candidates(base):
            if candidate in self._fine_tunes:
                return self._fine_tunes[candidate]
            if candidate in self._ft_aliases:
                return self._fine_tunes[self._ft_aliases[candidate]]
        main = self._lookup(base)
        return None if main is None else self._ft_by_canonical.get(main.model)


def describe(price: Price, model: str) -> str:
    """Human-readable account of a price, for ``metergate prices check MODEL``."""
    asked = model.strip().lower()
    if price.fine_tune:
        how = f"fine-tune of {price.model.removeprefix(_FINE_TUNE_PREFIX)} (fine-tune rates)"
    elif asked == price.model:
        how = "exact catalog entry"
    elif asked in price.aliases:
        how = f"alias of {price.model}"
    else:
        how = f"resolved to {price.model} (dated snapshot or -latest name)"
    lines = [f"{model} → {price.model}", f"  resolved       {how}"]
    if price.provider:
        lines.append(f"  provider       {price.provider}")
    lines += _rate_lines(price.rates, indent="  ")
    if price.long_context is not None:
        tier = price.long_context
        lines.append(f"  long context   above {tier.threshold:,} input tokens, whole request at:")
        lines += _rate_lines(tier.rates, indent="    ")
    limits = [
        f"max output {price.max_output_tokens:,}" if price.max_output_tokens is not None else "",
        f"context window {price.context_window:,}" if price.context_window is not None else "",
    ]
    lines.append(f"  limits         {'; '.join(x for x in limits if x) or 'unknown'}")
    lines.append(f"  source         {price.source}")
    lines.append(f"  effective      {price.effective}")
    lines.append(
        f"  confirmed      {'yes' if price.confirmed else 'NO (not seen on provider page)'}"
    )
    if price.note:
        lines.append(f"  note           {price.note}")
    example = cost_nanos(price, Usage(input=1000, output=1000))
    lines.append(
        f"  example        1,000 input + 1,000 output tokens = "
        f"${_nanos_to_usd(example)} ({example:,} nano-USD)"
    )
    return "\n".join(lines)


# ───────────────────────────── loading and validation ─────────────────────────────


class _CatalogLoader(yaml.SafeLoader):
    """Safe YAML loader that keeps floats and dates as their exact source text.

    A float node becomes a str, so ``0.075`` reaches Decimal as "0.075" and never as the
    binary float 0.07499999999999999722...; a date becomes its ISO text.
    """


def _scalar_text(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    assert isinstance(node, yaml.ScalarNode)
    return str(loader.construct_scalar(node))


_CatalogLoader.add_constructor("tag:yaml.org,2002:float", _scalar_text)
_CatalogLoader.add_constructor("tag:yaml.org,2002:timestamp", _scalar_text)


def _load_yaml(text: str, origin: str) -> Mapping[str, Any]:
    try:
        doc = yaml.load(text, Loader=_CatalogLoader)  # a SafeLoader subclass: no object tags
    except yaml.YAMLError as exc:
        raise PriceCatalogError(f"{origin}: not valid YAML: {exc}") from exc
    if not isinstance(doc, Mapping):
        raise PriceCatalogError(f"{origin}: the top level must be a mapping with `models:`.")
    return doc


def _raw_section(doc: Mapping[str, Any], section: str) -> Mapping[str, Any]:
    raw = doc.get(section) or {}
    return raw if isinstance(raw, Mapping) else {}


def _parse_document(
    doc: Mapping[str, Any], origin: str
) -> tuple[dict[str, Price], dict[str, Price]]:
    unknown = set(doc) - {"schema_version", "models", "fine_tunes"}
    if unknown:
        raise PriceCatalogError(
            f"{origin}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}; "
            "expected schema_version, models, fine_tunes."
        )
    version = doc.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise PriceCatalogError(
            f"{origin}: schema_version {version!r} is not supported; use {SCHEMA_VERSION}."
        )
    sections: list[dict[str, Price]] = []
    for section, fine_tune in (("models", False), ("fine_tunes", True)):
        raw = doc.get(section) or {}
        if not isinstance(raw, Mapping):
            raise PriceCatalogError(f"{origin}: `{section}` must be a mapping of name to entry.")
        parsed: dict[str, Price] = {}
        for name, entry in raw.items():
            price = _parse_entry(str(name), entry, origin, fine_tune=fine_tune)
            key = price.model.removeprefix(_FINE_TUNE_PREFIX)
            if key in parsed:
                raise PriceCatalogError(f"{origin}: {section} entry '{key}' appears twice.")
            parsed[key] = price
        sections.append(parsed)
    return sections[0], sections[1]


def _parse_entry(name: str, raw: Any, origin: str, *, fine_tune: bool) -> Price:
    kind = "fine-tune" if fine_tune else "model"
    canonical = name.strip().lower()
    if fine_tune:
        canonical = canonical.removeprefix(_FINE_TUNE_PREFIX)  # "ft:<base>" keys accepted too
    where = f"{origin}: {kind} '{canonical}'"
    if not isinstance(raw, Mapping):
        raise PriceCatalogError(f"{where}: the entry must be a mapping of fields.")
    # Fine-tunes have no long-context tier in any provider's price list.
    allowed = _ENTRY_FIELDS - {"long_context"} if fine_tune else _ENTRY_FIELDS
    unknown = set(raw) - allowed
    if unknown:
        raise PriceCatalogError(
            f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}. "
            "Check the spelling against the schema at the top of prices.yaml."
        )
    for required in ("source", "effective"):
        if not str(raw.get(required) or "").strip():
            raise PriceCatalogError(f"{where}: `{required}` is required.")
    effective = str(raw["effective"]).strip()
    try:
        date.fromisoformat(effective)
    except ValueError:
        raise PriceCatalogError(
            f"{where}: effective {effective!r} is not an ISO date (YYYY-MM-DD)."
        ) from None
    confirmed = raw.get("confirmed", True)
    if not isinstance(confirmed, bool):
        raise PriceCatalogError(f"{where}: `confirmed` must be true or false.")
    aliases = raw.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise PriceCatalogError(f"{where}: `aliases` must be a list of model names.")
    return Price(
        model=(_FINE_TUNE_PREFIX + canonical) if fine_tune else canonical,
        rates=_parse_rates(raw, where),
        long_context=_parse_long_context(raw.get("long_context"), where),
        max_output_tokens=_optional_int(raw, "max_output_tokens", where),
        context_window=_optional_int(raw, "context_window", where),
        source=str(raw["source"]).strip(),
        effective=effective,
        confirmed=confirmed,
        fine_tune=fine_tune,
        provider=str(raw.get("provider") or ""),
        note=" ".join(str(raw.get("note") or "").split()),
        aliases=tuple(a.strip().lower() for a in aliases),
    )


def _parse_long_context(raw: Any, where: str) -> LongContext | None:
    if raw is None:
        return None
    where = f"{where} long_context"
    if not isinstance(raw, Mapping):
        raise PriceCatalogError(f"{where}: must be a mapping with threshold_input_tokens.")
    unknown = set(raw) - _LONG_CONTEXT_FIELDS
    if unknown:
        raise PriceCatalogError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}.")
    threshold = _optional_int(raw, "threshold_input_tokens", where)
    if threshold is None:
        raise PriceCatalogError(f"{where}: `threshold_input_tokens` is required.")
    return LongContext(threshold=threshold, rates=_parse_rates(raw, where))


def _parse_rates(raw: Mapping[str, Any], where: str) -> Rates:
    for required in ("input", "output"):
        if raw.get(required) is None:
            raise PriceCatalogError(f"{where}: rate `{required}` is required (USD per 1M tokens).")

    def rate(field: str) -> int | None:
        value = raw.get(field)
        return None if value is None else _usd_per_m_to_nanos(value, f"{where} field '{field}'")

    input_, output = rate("input"), rate("output")
    assert input_ is not None and output is not None  # checked above
    return Rates.of(
        input_,
        output,
        cached_input=rate("cached_input"),
        cache_write=rate("cache_write"),
        cache_write_1h=rate("cache_write_1h"),
        reasoning=rate("reasoning"),
    )


def _usd_per_m_to_nanos(value: object, where: str) -> int:
    """USD per 1M tokens (YAML text, int, Decimal) to exact int nano-USD per 1M tokens."""
    if isinstance(value, bool):
        raise PriceCatalogError(f"{where}: {value!r} is not a rate; write a number of USD.")
    if isinstance(value, float):
        text = repr(value)  # shortest round-trip text; from_mapping() callers may pass floats
    elif isinstance(value, int | str | Decimal):
        text = str(value).strip().replace("_", "")
    else:
        raise PriceCatalogError(f"{where}: {value!r} is not a rate; write a number of USD.")
    try:
        usd = Decimal(text.removeprefix("$"))
    except InvalidOperation:
        raise PriceCatalogError(f"{where}: {value!r} is not a number of USD.") from None
    if not usd.is_finite() or usd < 0:
        raise PriceCatalogError(f"{where}: {value!r} must be a finite, non-negative amount.")
    with localcontext() as ctx:
        ctx.prec = 60  # plenty: the multiplication below must be exact, never rounded
        nanos = usd * NANOS_PER_USD
    if nanos != nanos.to_integral_value():
        raise PriceCatalogError(
            f"{where}: {value!r} has more than 9 decimal places; rates are kept in "
            "nano-dollars per 1M tokens. Round it to 9 decimals or fix the typo."
        )
    return int(nanos)


def _optional_int(raw: Mapping[str, Any], field: str, where: str) -> int | None:
    value = raw.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PriceCatalogError(f"{where}: `{field}` must be a non-negative whole number.")
    return value


def _overlay(base: dict[str, Price], extra: Mapping[str, Price], raw: Mapping[str, Any]) -> None:
    """Replace or add ``extra`` entries; an entry written without aliases keeps the old ones."""
    raw_by_name = {str(k).strip().lower(): v for k, v in raw.items()}
    for name, price in extra.items():
        old = base.get(name)
        entry = raw_by_name.get(name, {})
        if old is not None and isinstance(entry, Mapping) and "aliases" not in entry:
            price = replace(price, aliases=old.aliases)
        base[name] = price


def _alias_index(entries: Mapping[str, Price], kind: str) -> dict[str, str]:
    index: dict[str, str] = {}
    for name, price in entries.items():
        for alias in price.aliases:
            if alias in entries:
                continue  # an entry of that exact name wins over the alias, by design
            other = index.get(alias)
            if other is not None and other != name:
                raise PriceCatalogError(
                    f"Price catalog: alias '{alias}' is claimed by {kind} entries '{other}' "
                    f"and '{name}'. Keep it on one entry."
                )
            index[alias] = name
    return index


def _candidates(key: str) -> Iterator[str]:
    """Names to try, most specific first: as given, without snapshot date, without -latest."""
    yield key
    stripped = _SNAPSHOT_SUFFIX.sub("", key)
    if stripped != key:
        yield stripped
    if key.endswith(_LATEST_SUFFIX):
        yield key.removesuffix(_LATEST_SUFFIX)


# ───────────────────────────── formatting ─────────────────────────────


def _nanos_to_usd(nanos: int, *, min_places: int = 2) -> str:
    """Exact decimal text of a nano-USD amount, at least ``min_places`` decimals."""
    text = format(Decimal(nanos).scaleb(-9).normalize(), "f")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(min_places, '0')}"


def _rate_lines(rates: Rates, *, indent: str) -> list[str]:
    lines = [("input", rates.input), ("cached input", rates.cached_input)]
    # Cache-write rates only matter where the provider bills writes (Anthropic); for the
    # others they equal input and would only add noise.
    if rates.cache_write != rates.input or rates.cache_write_1h != rates.cache_write:
        lines += [("cache write 5m", rates.cache_write), ("cache write 1h", rates.cache_write_1h)]
    lines.append(("output", rates.output))
    text = [f"{indent}{label:<14} ${_nanos_to_usd(v)} / 1M tokens" for label, v in lines]
    if rates.reasoning == rates.output:
        text.append(f"{indent}{'reasoning':<14} billed as output")
    else:
        text.append(f"{indent}{'reasoning':<14} ${_nanos_to_usd(rates.reasoning)} / 1M tokens")
    return text
