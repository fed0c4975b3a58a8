"""The ``alerts:`` block of the configuration, parsed into frozen settings.

::

    alerts:
      channels:
        - type: slack                      # a Slack-compatible incoming webhook
          url: ${SLACK_WEBHOOK_URL}
        - type: webhook                    # generic JSON (schema in proxy.alert_delivery)
          name: finance                    # default: the type; names must be unique
          url: https://hooks.example.com/metergate
          secret: ${METERGATE_ALERT_SECRET}   # optional: HMAC-SHA256 signature header
      thresholds: [50, 80, 100]            # percent of the limit; default 50, 80, 100
      forecast: {enabled: true, window_s: 3600, min_span_s: 600}   # or forecast: false
      budgets:                             # per-budget overrides, by budget name
        search-monthly: {thresholds: [90, 100], forecast: false}
      check_interval_s: 5
      top_contributors: 5
      delivery: {timeout_s: 10, retry_initial_s: 1, retry_max_s: 300,
                 give_up_after_s: 86400, poll_interval_s: 1, lease_s: 60}

Per-budget overrides live here, keyed by budget name, rather than as a field of the
budget entries: budget entries are also the documents of run-time budgets (CLI, admin
API) with their own validation, and a name here also covers a budget that is only
created at run time. Channel URLs and secrets are never logged or shown in ``repr``;
a Slack webhook URL is itself a secret. Secrets come from the environment through the
usual ``${VAR}`` interpolation (:mod:`proxy.settings`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Final, Literal
from urllib.parse import urlsplit

__all__ = [
    "CHANNEL_TYPES",
    "DEFAULT_THRESHOLDS",
    "AlertChannel",
    "AlertConfigError",
    "AlertSettings",
    "BudgetAlertRule",
    "DeliverySettings",
    "parse_alerts",
    "percent_text",
]

ChannelType = Literal["slack", "webhook"]
CHANNEL_TYPES: Final = ("slack", "webhook")
DEFAULT_THRESHOLDS: Final = (Decimal(50), Decimal(80), Decimal(100))
DEFAULT_CHECK_INTERVAL_S: Final = 5.0
DEFAULT_FORECAST_WINDOW_S: Final = 3_600.0
#: The burn rate needs samples spanning at least this long: a forecast from a minute of
#: traffic would fire on every burst.
DEFAULT_FORECAST_MIN_SPAN_S: Final = 600.0
DEFAULT_TOP_CONTRIBUTORS: Final = 5
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def percent_text(pct: Decimal) -> str:
    """A threshold as plain text: ``80``, ``33.3`` (never ``8E+1``)."""
    return format(pct.normalize(), "f")


class AlertConfigError(ValueError):
    """The ``alerts:`` block is invalid; the message names the field."""


@dataclass(frozen=True, slots=True)
class AlertChannel:
    """Where alerts go. ``url`` and ``secret`` are secrets: kept out of ``repr``."""

    name: str
    type: ChannelType
    url: str = field(repr=False)
    secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class BudgetAlertRule:
    """The thresholds (percent of the limit) and forecast switch of one budget."""

    thresholds: tuple[Decimal, ...] = DEFAULT_THRESHOLDS
    forecast: bool = True


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How the background worker delivers: per-POST timeout, exponential backoff with
    jitter between ``retry_initial_s`` and ``retry_max_s``, giving up (logged, counted
    ``failed``) once an alert is ``give_up_after_s`` old. ``lease_s`` is how long one
    replica owns an entry it is posting; it must exceed ``timeout_s``."""

    timeout_s: float = 10.0
    retry_initial_s: float = 1.0
    retry_max_s: float = 300.0
    give_up_after_s: float = 86_400.0
    poll_interval_s: float = 1.0
    lease_s: float = 60.0
    batch: int = 10


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """Everything about budget alerts (see the module docstring)."""

    channels: tuple[AlertChannel, ...]
    thresholds: tuple[Decimal, ...] = DEFAULT_THRESHOLDS
    forecast: bool = True
    forecast_window_s: float = DEFAULT_FORECAST_WINDOW_S
    forecast_min_span_s: float = DEFAULT_FORECAST_MIN_SPAN_S
    budgets: Mapping[str, BudgetAlertRule] = field(default_factory=dict)
    check_interval_s: float = DEFAULT_CHECK_INTERVAL_S
    top_contributors: int = DEFAULT_TOP_CONTRIBUTORS
    delivery: DeliverySettings = field(default_factory=DeliverySettings)

    def rule_for(self, budget: str) -> BudgetAlertRule:
        """The override of ``budget``, else the defaults."""
        return self.budgets.get(budget) or BudgetAlertRule(self.thresholds, self.forecast)

    def channel(self, name: str) -> AlertChannel | None:
        """The channel called ``name``, or None."""
        return next((ch for ch in self.channels if ch.name == name), None)


# ─────────────────────────────────────── parsing ───────────────────────────────────────


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise AlertConfigError(f"{where}: must be a mapping (key: value).")
    return value


def _no_unknown(m: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    unknown = sorted(str(k) for k in m if k not in allowed)
    if unknown:
        raise AlertConfigError(
            f"{where}.{unknown[0]}: unknown field; the fields here are "
            f"{', '.join(sorted(allowed))}."
        )


def _seconds(m: Mapping[str, Any], name: str, default: float, where: str) -> float:
    value = m.get(name, default)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise AlertConfigError(f"{where}.{name}: must be a number of seconds.") from None
    if isinstance(value, bool) or not 0 < seconds < 10**9:
        raise AlertConfigError(f"{where}.{name}: must be a number of seconds above zero.")
    return seconds


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise AlertConfigError(f"{where}: must be true or false.")
    return value


def _thresholds(value: Any, where: str) -> tuple[Decimal, ...]:
    if not isinstance(value, list) or not value:
        raise AlertConfigError(f"{where}: must be a non-empty list of percentages like [50, 80].")
    out: set[Decimal] = set()
    for i, item in enumerate(value):
        try:
            if isinstance(item, bool):
                raise InvalidOperation
            pct = Decimal(str(item).strip().removesuffix("%"))
        except InvalidOperation:
            raise AlertConfigError(f"{where}[{i}]: {item!r} is not a percentage.") from None
        if not pct.is_finite() or not 0 < pct <= 1000 or pct != round(pct, 2):
            raise AlertConfigError(
                f"{where}[{i}]: must be a percentage above 0 and at most 1000, with at most "
                f"two decimals, not {item!r}."
            )
        out.add(pct)  # a set: 80 and 80.0 are one threshold
    return tuple(sorted(out))


def _is_http_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False


def _channels(value: Any) -> tuple[AlertChannel, ...]:
    where = "alerts.channels"
    if not isinstance(value, list) or not value:
        raise AlertConfigError(
            f"{where}: at least one channel is required, e.g. "
            "[{type: slack, url: ${SLACK_WEBHOOK_URL}}]."
        )
    out: list[AlertChannel] = []
    for i, entry in enumerate(value):
        at = f"{where}[{i}]"
        m = _mapping(entry, at)
        _no_unknown(m, at, {"type", "name", "url", "secret"})
        kind = m.get("type")
        if kind not in CHANNEL_TYPES:
            raise AlertConfigError(f"{at}.type: must be one of {', '.join(CHANNEL_TYPES)}.")
        name = m.get("name", kind)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise AlertConfigError(f"{at}.name: 1 to 64 letters, digits, '_', '.' or '-'.")
        if any(ch.name == name for ch in out):
            raise AlertConfigError(
                f"{at}.name: the name {name!r} is used twice; give each channel its own name."
            )
        url = m.get("url")
        if not _is_http_url(url):
            # Never echo the value: a webhook URL is a secret.
            raise AlertConfigError(f"{at}.url: required, an http(s) URL.")
        secret = m.get("secret")
        if kind == "slack" and secret is not None:
            raise AlertConfigError(f"{at}.secret: only webhook channels are signed.")
        if secret is not None and (not isinstance(secret, str) or len(secret) < 16):
            raise AlertConfigError(f"{at}.secret: must be a string of at least 16 characters.")
        out.append(AlertChannel(name=name, type=kind, url=str(url), secret=secret))
    return tuple(out)


def _forecast(value: Any) -> tuple[bool, float, float]:
    where = "alerts.forecast"
    if isinstance(value, bool):
        return value, DEFAULT_FORECAST_WINDOW_S, DEFAULT_FORECAST_MIN_SPAN_S
    m = _mapping(value, where)
    _no_unknown(m, where, {"enabled", "window_s", "min_span_s"})
    window = _seconds(m, "window_s", DEFAULT_FORECAST_WINDOW_S, where)
    span = _seconds(m, "min_span_s", min(DEFAULT_FORECAST_MIN_SPAN_S, window), where)
    if span > window:
        raise AlertConfigError(f"{where}.min_span_s: must not exceed window_s ({window:g}).")
    return _bool(m.get("enabled", True), f"{where}.enabled"), window, span


def _delivery(value: Any) -> DeliverySettings:
    where = "alerts.delivery"
    m = _mapping(value, where)
    d = DeliverySettings()
    _no_unknown(m, where, {f for f in DeliverySettings.__slots__ if f != "batch"})
    timeout = _seconds(m, "timeout_s", d.timeout_s, where)
    out = DeliverySettings(
        timeout_s=timeout,
        retry_initial_s=_seconds(m, "retry_initial_s", d.retry_initial_s, where),
        retry_max_s=_seconds(m, "retry_max_s", d.retry_max_s, where),
        give_up_after_s=_seconds(m, "give_up_after_s", d.give_up_after_s, where),
        poll_interval_s=_seconds(m, "poll_interval_s", d.poll_interval_s, where),
        lease_s=_seconds(m, "lease_s", max(d.lease_s, 3 * timeout), where),
    )
    if out.retry_max_s < out.retry_initial_s:
        raise AlertConfigError(f"{where}.retry_max_s: must be at least retry_initial_s.")
    if out.lease_s <= out.timeout_s:
        raise AlertConfigError(
            f"{where}.lease_s: must exceed timeout_s ({out.timeout_s:g}), or a slow POST "
            "would lose its lease and another replica would deliver the alert again."
        )
    return out


def parse_alerts(value: Any) -> AlertSettings | None:
    """The ``alerts:`` block (already interpolated), or None when it is absent."""
    if value is None:
        return None
    root = _mapping(value, "alerts")
    _no_unknown(
        root,
        "alerts",
        {"channels", "thresholds", "forecast", "budgets", "check_interval_s"}
        | {"top_contributors", "delivery"},
    )
    thresholds = (
        _thresholds(root["thresholds"], "alerts.thresholds")
        if "thresholds" in root
        else DEFAULT_THRESHOLDS
    )
    forecast, window, span = _forecast(root.get("forecast", True))
    budgets: dict[str, BudgetAlertRule] = {}
    for name, entry in _mapping(root.get("budgets", {}), "alerts.budgets").items():
        at = f"alerts.budgets.{name}"
        m = _mapping(entry, at)
        _no_unknown(m, at, {"thresholds", "forecast"})
        budgets[str(name)] = BudgetAlertRule(
            thresholds=_thresholds(m["thresholds"], f"{at}.thresholds")
            if "thresholds" in m
            else thresholds,
            forecast=_bool(m.get("forecast", forecast), f"{at}.forecast"),
        )
    top = root.get("top_contributors", DEFAULT_TOP_CONTRIBUTORS)
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 50:
        raise AlertConfigError("alerts.top_contributors: must be a whole number from 0 to 50.")
    return AlertSettings(
        channels=_channels(root.get("channels")),
        thresholds=thresholds,
        forecast=forecast,
        forecast_window_s=window,
        forecast_min_span_s=span,
        budgets=budgets,
        check_interval_s=_seconds(root, "check_interval_s", DEFAULT_CHECK_INTERVAL_S, "alerts"),
        top_contributors=top,
        delivery=_delivery(root.get("delivery", {})),
    )
