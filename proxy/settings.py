"""Configuration: YAML plus environment, validated once at start-up into frozen settings.

This is the only module that reads ``os.environ``. ``${VAR}`` in any string value is
replaced by the environment variable (``${VAR:-default}`` gives a default); a variable
that is unset and has no default is an error naming the field. Every validation error
is a :class:`ConfigError` whose message names the field (``upstreams.openai.url``) and
says what to write instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from proxy.alert_config import AlertConfigError, AlertSettings, parse_alerts
from proxy.budget import BudgetConfigError, BudgetSpec, parse_budgets

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_STORE = "sqlite:///./metergate.db"
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT_S = 10.0
#: Longest silence allowed between two reads from an upstream. Reasoning models can
#: think for minutes before the first byte, so this bounds gaps, not the whole request.
DEFAULT_READ_TIMEOUT_S = 600.0
#: Upstream connections kept per upstream. aiohttp's default of 100 would queue every
#: request past the 100th concurrent stream, so the pool is sized deliberately large.
DEFAULT_POOL_SIZE = 1024
DEFAULT_MAX_TAGS = 16
DEFAULT_TAG_MAX_LEN = 64
DEFAULT_SHUTDOWN_GRACE_S = 30.0
DEFAULT_STORE_TIMEOUT_MS = 50
DEFAULT_RESERVATION_TTL_S = 900.0
DEFAULT_MAX_LABEL_VALUES = 100
#: Where the fail-open journal lives when ``journal_dir`` is not set and the store is
#: not a file (an SQLite store keeps its journal next to its database file).
DEFAULT_JOURNAL_DIR = "./metergate-journal"
#: The shortest ``key_secret`` accepted (``openssl rand -hex 32`` gives 64 characters).
MIN_KEY_SECRET_CHARS = 32
ON_STORE_ERROR = ("fail_open", "fail_closed")
UNKNOWN_MODEL_POLICIES = ("reject", "charge_fallback")
WIRE_FORMATS = ("openai", "anthropic")
#: Path segments the proxy serves itself; no upstream may take these names.
RESERVED_NAMES = frozenset({"metrics", "healthz", "readyz", "admin", "ui"})
ROOT_FIELDS = frozenset(
    {
        "server", "store", "unknown_model", "fallback_price", "passthrough_keys", "upstreams",
        "keys", "prices", "tiktoken_dir", "tags", "budgets", "on_store_error",
        "store_timeout_ms", "reservation_ttl_s", "journal_dir", "admin_token", "metrics",
        "alerts", "key_secret",
    }
)  # fmt: skip
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field and the fix."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Where the proxy listens and how much it accepts."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    access_log: bool = True
    #: A second listener for /admin, /ui and /metrics (None: they share the proxy's).
    admin_port: int | None = None
    admin_host: str | None = None


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """Opt-in metric labels (``key``, ``user``) and the cap on their distinct values."""

    labels: tuple[str, ...] = ()
    max_label_values: int = DEFAULT_MAX_LABEL_VALUES


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """One provider endpoint the proxy forwards to, fixed by config."""

    name: str
    url: str
    format: str
    api_key: str | None
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    pool_size: int = DEFAULT_POOL_SIZE


@dataclass(frozen=True, slots=True)
class KeySettings:
    """A caller's key as declared in the config."""

    key: str
    name: str
    team: str | None = None
    user: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the proxy is configured with."""

    server: ServerSettings = field(default_factory=ServerSettings)
    store: str = DEFAULT_STORE
    unknown_model: str = "reject"
    fallback_price: Mapping[str, str] | None = None
    passthrough_keys: bool = False
    upstreams: Mapping[str, UpstreamSettings] = field(default_factory=dict)
    keys: tuple[KeySettings, ...] = ()
    prices: str | None = None
    tiktoken_dir: str | None = None
    max_tags: int = DEFAULT_MAX_TAGS
    tag_max_len: int = DEFAULT_TAG_MAX_LEN
    budgets: tuple[BudgetSpec, ...] = ()
    on_store_error: str = "fail_open"
    store_timeout_ms: int = DEFAULT_STORE_TIMEOUT_MS
    reservation_ttl_s: float = DEFAULT_RESERVATION_TTL_S
    journal_dir: str | None = None
    admin_token: str | None = None
    #: HMAC secret of issued keys (proxy.keys); kept out of repr so it never reaches a log.
    key_secret: str | None = field(default=None, repr=False)
    alerts: AlertSettings | None = None  # see proxy.alert_config
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    source: str = "<defaults>"


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, interpolate and validate the YAML file at ``path``."""
    env = os.environ if environ is None else environ
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"Cannot read the config file {path}: {exc.strerror}.") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"The config file {path} is not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    settings = parse_settings(raw, env)
    base = Path(path).resolve().parent
    prices = settings.prices
    if prices is not None and not Path(prices).is_absolute() and not Path(prices).exists():
        # A relative catalog path is read relative to the config file when it is not
        # found relative to the working directory.
        candidate = base / prices
        if candidate.exists():
            prices = str(candidate)
    return replace(settings, prices=prices, source=str(path))


def tiktoken_dir_from_env(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> str | None:
    """The tiktoken vocabulary directory: the setting, else ``METERGATE_TIKTOKEN_DIR``."""
    env = os.environ if environ is None else environ
    return settings.tiktoken_dir or env.get("METERGATE_TIKTOKEN_DIR") or None


def journal_dir_for(settings: Settings) -> str | None:
    """The fail-open journal's directory; None for the memory store, which cannot fail."""
    if settings.journal_dir:
        return settings.journal_dir
    parts = urlsplit(settings.store)
    path = unquote(parts.path)[1:]  # sqlite:///rel -> rel, sqlite:////abs -> /abs
    if parts.scheme == "memory" or path == ":memory:":
        return None
    if parts.scheme == "sqlite":
        # Not "<db>-journal": that is the name of SQLite's own rollback journal file.
        return path + ".spend-journal"
    return DEFAULT_JOURNAL_DIR


def parse_settings(raw: Any, environ: Mapping[str, str]) -> Settings:
    """Validate an already-parsed config mapping (``environ`` for ``${VAR}``)."""
    data = _interpolate(raw, environ, "")
    root = _mapping(data, "config")
    _no_unknown(root, "config", ROOT_FIELDS)
    server = _server(root.get("server", {}))
    store = _str(root.get("store", DEFAULT_STORE), "store")
    scheme = urlsplit(store).scheme
    if scheme not in ("memory", "sqlite", "redis", "rediss", "redis+cluster", "rediss+cluster"):
        raise ConfigError(
            f"store: unknown store URL {store!r}; use memory://, sqlite:///path/to/file.db "
            "or redis://host:port/db."
        )
    unknown_model = _str(root.get("unknown_model", "reject"), "unknown_model")
    if unknown_model not in UNKNOWN_MODEL_POLICIES:
        raise ConfigError(
            f"unknown_model: must be one of {', '.join(UNKNOWN_MODEL_POLICIES)}, "
            f"not {unknown_model!r}."
        )
    fallback = root.get("fallback_price")
    fallback_price: dict[str, str] | None = None
    if fallback is not None:
        fb = _mapping(fallback, "fallback_price")
        _no_unknown(fb, "fallback_price", {"input", "output", "cached_input", "reasoning"})
        fallback_price = {k: _decimal_text(v, f"fallback_price.{k}") for k, v in fb.items()}
        for required in ("input", "output"):
            if required not in fallback_price:
                raise ConfigError(f"fallback_price.{required}: required (USD per 1M tokens).")
    if unknown_model == "charge_fallback" and fallback_price is None:
        raise ConfigError(
            "fallback_price: required when unknown_model is charge_fallback, "
            "e.g. fallback_price: {input: 15, output: 60} (USD per 1M tokens)."
        )
    on_store_error = _str(root.get("on_store_error", "fail_open"), "on_store_error")
    if on_store_error not in ON_STORE_ERROR:
        raise ConfigError(
            f"on_store_error: must be one of {', '.join(ON_STORE_ERROR)}, not {on_store_error!r}."
        )
    try:
        budgets = parse_budgets(root.get("budgets", []))
    except BudgetConfigError as exc:
        raise ConfigError(str(exc)) from None
    try:
        alerts = parse_alerts(root.get("alerts"))
    except AlertConfigError as exc:
        raise ConfigError(str(exc)) from None
    upstreams = _upstreams(root.get("upstreams"))
    keys = _keys(root.get("keys", []))
    prices = root.get("prices")
    tags = _mapping(root.get("tags", {}), "tags")
    _no_unknown(tags, "tags", {"max_count", "max_length"})
    return Settings(
        server=server,
        store=store,
        unknown_model=unknown_model,
        fallback_price=fallback_price,
        passthrough_keys=_bool(root.get("passthrough_keys", False), "passthrough_keys"),
        upstreams=upstreams,
        keys=keys,
        prices=None if prices is None else _str(prices, "prices"),
        tiktoken_dir=_opt_str(root.get("tiktoken_dir"), "tiktoken_dir"),
        max_tags=_int(tags.get("max_count", DEFAULT_MAX_TAGS), "tags.max_count", 0, 256),
        tag_max_len=_int(tags.get("max_length", DEFAULT_TAG_MAX_LEN), "tags.max_length", 1, 256),
        budgets=budgets,
        on_store_error=on_store_error,
        store_timeout_ms=_int(
            root.get("store_timeout_ms", DEFAULT_STORE_TIMEOUT_MS), "store_timeout_ms", 1, 60_000
        ),
        reservation_ttl_s=_float(
            root.get("reservation_ttl_s", DEFAULT_RESERVATION_TTL_S), "reservation_ttl_s"
        ),
        journal_dir=_opt_str(root.get("journal_dir"), "journal_dir") or None,
        admin_token=_opt_str(root.get("admin_token"), "admin_token") or None,
        key_secret=_key_secret(root.get("key_secret")),
        alerts=alerts,
        metrics=_metrics(root.get("metrics", {})),
    )


def _metrics(value: Any) -> MetricsSettings:
    m = _mapping(value, "metrics")
    _no_unknown(m, "metrics", {"labels", "max_label_values"})
    labels = m.get("labels", [])
    if not isinstance(labels, list) or any(v not in ("key", "user") for v in labels):
        raise ConfigError(
            f"metrics.labels: a list of optional labels among key and user, not {labels!r}."
        )
    return MetricsSettings(
        labels=tuple(dict.fromkeys(labels)),
        max_label_values=_int(
            m.get("max_label_values", DEFAULT_MAX_LABEL_VALUES),
            "metrics.max_label_values",
            1,
            100_000,
        ),
    )


def _key_secret(value: Any) -> str | None:
    secret = _opt_str(value, "key_secret") or None
    if secret is not None and len(secret) < MIN_KEY_SECRET_CHARS:
        raise ConfigError(
            f"key_secret: must be at least {MIN_KEY_SECRET_CHARS} characters; generate one "
            "with `openssl rand -hex 32` and pass it as key_secret: ${METERGATE_KEY_SECRET}."
        )
    return secret


def _server(value: Any) -> ServerSettings:
    m = _mapping(value, "server")
    _no_unknown(
        m,
        "server",
        {"host", "port", "max_body_bytes", "shutdown_grace_s", "access_log", "admin_port",
         "admin_host"},
    )  # fmt: skip
    admin_port = m.get("admin_port")
    if admin_port is not None:
        admin_port = _int(admin_port, "server.admin_port", 0, 65535)
        if admin_port != 0 and admin_port == m.get("port", DEFAULT_PORT):
            raise ConfigError(
                "server.admin_port: it is the proxy's own port; give the admin listener "
                "another port, or leave admin_port out to serve /admin on the proxy's port."
            )
    return ServerSettings(
        admin_port=admin_port,
        admin_host=_opt_str(m.get("admin_host"), "server.admin_host"),
        host=_str(m.get("host", DEFAULT_HOST), "server.host"),
        port=_int(m.get("port", DEFAULT_PORT), "server.port", 0, 65535),
        max_body_bytes=_int(
            m.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES), "server.max_body_bytes", 1024, 1 << 31
        ),
        shutdown_grace_s=_float(
            m.get("shutdown_grace_s", DEFAULT_SHUTDOWN_GRACE_S), "server.shutdown_grace_s"
        ),
        access_log=_bool(m.get("access_log", True), "server.access_log"),
    )


def _upstreams(value: Any) -> dict[str, UpstreamSettings]:
    if value is None:
        raise ConfigError(
            "upstreams: at least one upstream is required, e.g. "
            "upstreams: {openai: {url: https://api.openai.com, format: openai}}."
        )
    m = _mapping(value, "upstreams")
    out: dict[str, UpstreamSettings] = {}
    for name, spec in m.items():
        where = f"upstreams.{name}"
        if not isinstance(name, str) or not _NAME_RE.match(name) or name in RESERVED_NAMES:
            raise ConfigError(
                f"{where}: the name must be letters, digits, '-', '_' or '.', and not one of "
                f"{', '.join(sorted(RESERVED_NAMES))}."
            )
        s = _mapping(spec, where)
        _no_unknown(
            s,
            where,
            {"url", "format", "api_key", "connect_timeout_s", "read_timeout_s", "pool_size"},
        )
        url = _str(s.get("url"), f"{where}.url").rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}.url: must be an http(s) URL like https://api.openai.com.")
        if parts.query or parts.fragment:
            raise ConfigError(f"{where}.url: must not have a query string or fragment.")
        fmt = _str(s.get("format", name if name in WIRE_FORMATS else None), f"{where}.format")
        if fmt not in WIRE_FORMATS:
            raise ConfigError(f"{where}.format: must be one of {', '.join(WIRE_FORMATS)}.")
        out[name] = UpstreamSettings(
            name=name,
            url=url,
            format=fmt,
            api_key=_opt_str(s.get("api_key"), f"{where}.api_key") or None,
            connect_timeout_s=_float(
                s.get("connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S), f"{where}.connect_timeout_s"
            ),
            read_timeout_s=_float(
                s.get("read_timeout_s", DEFAULT_READ_TIMEOUT_S), f"{where}.read_timeout_s"
            ),
            pool_size=_int(s.get("pool_size", DEFAULT_POOL_SIZE), f"{where}.pool_size", 1, 100_000),
        )
    if not out:
        raise ConfigError("upstreams: at least one upstream is required.")
    return out


def _keys(value: Any) -> tuple[KeySettings, ...]:
    if not isinstance(value, list):
        raise ConfigError("keys: must be a list of {key, name, team, user} entries.")
    out: list[KeySettings] = []
    seen_keys: set[str] = set()
    seen_names: set[str] = set()
    for i, entry in enumerate(value):
        where = f"keys[{i}]"
        m = _mapping(entry, where)
        _no_unknown(m, where, {"key", "name", "team", "user", "tags"})
        key = _str(m.get("key"), f"{where}.key")
        if len(key) < 8:
            raise ConfigError(f"{where}.key: must be at least 8 characters long.")
        name = _str(m.get("name"), f"{where}.name")
        if key in seen_keys:
            raise ConfigError(f"{where}.key: the same key is declared twice.")
        if name in seen_names:
            raise ConfigError(f"{where}.name: the name {name!r} is declared twice.")
        seen_keys.add(key)
        seen_names.add(name)
        tags = m.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ConfigError(f"{where}.tags: must be a list of strings.")
        out.append(
            KeySettings(
                key=key,
                name=name,
                team=_opt_str(m.get("team"), f"{where}.team"),
                user=_opt_str(m.get("user"), f"{where}.user"),
                tags=tuple(tags),
            )
        )
    return tuple(out)


def _interpolate(value: Any, environ: Mapping[str, str], where: str) -> Any:
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            var, default = match.group(1), match.group(2)
            if var in environ:
                return environ[var]
            if default is not None:
                return default
            raise ConfigError(
                f"{where or 'config'}: the environment variable {var} is not set; set it, "
                f"or give a default with ${{{var}:-value}}."
            )

        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {
            k: _interpolate(v, environ, f"{where}.{k}" if where else str(k))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, environ, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping (key: value), not {type(value).__name__}.")
    return value


def _no_unknown(m: Mapping[str, Any], where: str, allowed: set[str] | frozenset[str]) -> None:
    unknown = sorted(str(k) for k in m if k not in allowed)
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown field; "
            f"the fields here are {', '.join(sorted(allowed))}."
        )


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: required, and must be a non-empty string.")
    return value


def _opt_str(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string.")
    return value


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{where}: must be true or false.")


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{where}: must be a whole number from {lo} to {hi}.")
    return value


def _float(value: Any, where: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: must be a number of seconds.") from None
    if not f > 0:
        raise ConfigError(f"{where}: must be greater than zero.")
    return f


def _decimal_text(value: Any, where: str) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"\d+(\.\d{1,9})?", text):
        raise ConfigError(f"{where}: must be a non-negative price in USD per 1M tokens, like 2.50.")
    return text
