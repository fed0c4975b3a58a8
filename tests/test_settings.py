"""Config loading: interpolation, defaults, and errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.settings import ConfigError, load_settings, parse_settings

REPO = Path(__file__).resolve().parents[1]

MINIMAL: dict[str, Any] = {
    "upstreams": {"openai": {"url": "https://api.openai.com", "format": "openai"}},
}


def test_example_config_loads_without_any_environment() -> None:
    settings = load_settings(REPO / "config" / "metergate.example.yaml", environ={})
    assert settings.store == "sqlite:///./metergate.db"
    assert set(settings.upstreams) == {"openai", "anthropic"}
    assert settings.upstreams["openai"].api_key is None  # ${OPENAI_API_KEY:-} is empty
    assert [k.name for k in settings.keys] == ["app-a", "app-b"]
    assert settings.server.max_body_bytes == 32 * 1024 * 1024


def test_the_issue_config_shape_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        """
server: {host: 127.0.0.1, port: 8080}
store: sqlite:///./metergate.db
unknown_model: reject
passthrough_keys: false
upstreams:
  openai:    {url: https://api.openai.com,    format: openai,    api_key: "${OPENAI_API_KEY}"}
  anthropic: {url: https://api.anthropic.com, format: anthropic, api_key: "${ANTHROPIC_API_KEY}"}
keys:
  - {key: "${APP_A_KEY}", name: app-a, team: search, user: alice}
prices: config/prices.yaml
"""
    )
    env = {"OPENAI_API_KEY": "sk-o", "ANTHROPIC_API_KEY": "sk-a", "APP_A_KEY": "mg-aaaaaaaaaa"}
    settings = load_settings(path, environ=env)
    assert settings.upstreams["anthropic"].api_key == "sk-a"
    assert settings.keys[0].key == "mg-aaaaaaaaaa"
    assert settings.keys[0].team == "search"


def test_env_defaults_and_missing_variables() -> None:
    raw = {**MINIMAL, "store": "${STORE:-memory://}"}
    assert parse_settings(raw, {}).store == "memory://"
    assert parse_settings(raw, {"STORE": "sqlite:///x.db"}).store == "sqlite:///x.db"
    with pytest.raises(
        ConfigError, match=r"upstreams\.openai\.api_key: the environment variable K"
    ):
        parse_settings({"upstreams": {"openai": {"url": "https://x", "api_key": "${K}"}}}, {})


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"store": "mysql://x"}, "store"),
        ({"unknown_model": "free"}, "unknown_model"),
        ({"unknown_model": "charge_fallback"}, "fallback_price"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"colour": "red"}}, "server.colour"),
        ({"upstreams": {"openai": {"url": "ftp://x", "format": "openai"}}}, "upstreams.openai.url"),
        ({"upstreams": {"x": {"url": "https://x", "format": "cohere"}}}, "upstreams.x.format"),
        ({"upstreams": {"metrics": {"url": "https://x", "format": "openai"}}}, "upstreams.metrics"),
        ({"keys": [{"key": "short", "name": "a"}]}, r"keys\[0\]\.key"),
        (
            {"keys": [{"key": "mg-123456789", "name": "a"}, {"key": "mg-123456789", "name": "b"}]},
            r"keys\[1\]\.key",
        ),
        ({"keys": [{"key": "mg-123456789"}]}, r"keys\[0\]\.name"),
        ({"fallback_price": {"input": "cheap", "output": 1}}, "fallback_price.input"),
        ({"passthrough_keys": "maybe"}, "passthrough_keys"),
        ({"tags": {"max_count": -1}}, "tags.max_count"),
        ({"budget": []}, "config.budget"),
    ],
)
def test_errors_name_the_field(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}"):
        parse_settings({**MINIMAL, **patch}, {})


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Cannot read"):
        load_settings(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, environ={})


def test_relative_prices_path_is_found_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "my-prices.yaml").write_text("models: {}\n")
    cfg = tmp_path / "m.yaml"
    cfg.write_text("upstreams: {openai: {url: 'https://api.openai.com'}}\nprices: my-prices.yaml\n")
    assert load_settings(cfg, environ={}).prices == str(tmp_path / "my-prices.yaml")
