"""Dashboards and Prometheus rules, proved against a real Prometheus.

- Every panel query of every dashboard in ``dashboards/`` (Grafana variables substituted)
  is evaluated by a real Prometheus that scraped a real proxy under traffic from the
  real OpenAI and Anthropic SDKs (plain and streamed requests, streams cut short whose
  usage the proxy estimates, budget refusals), and must parse and return a series.
  So must every template variable query, and the recording rules of
  ``config/prometheus/rules.yml``, which that Prometheus evaluates with no rule error.
- Every dashboard passes a structural check of the Grafana dashboard schema
  (schemaVersion >= 39, uid, panels with ids, types, gridPos inside the 24-column
  grid, a ``${datasource}`` data source on every panel and target, defined variables).
- ``promtool check rules`` / ``promtool test rules`` pass, and every alerting rule has
  a unit test; the example prometheus.yml passes ``promtool check config``.

Needs the Debian package ``prometheus`` (prometheus and promtool); fails without it.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import yaml

try:  # the transport under the SDKs in this venv (a fork of httpx), else httpx itself
    from httpx2 import TransportError
except ImportError:  # pragma: no cover
    from httpx import TransportError  # type: ignore[no-redef]

from tests.conftest import KEY_A, KEY_B, ProxyFactory, RunningProxy
from tests.e2e_support import metric_sum
from tests.prom_server import PROMTOOL, PromServer, binary, start_prometheus

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
PROM_CONFIG = ROOT / "config" / "prometheus"
DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))
REQUIRED_VARIABLES = {"datasource", "team", "model", "upstream"}

#: What Grafana would put in place of its variables for "All" over a short range.
SUBSTITUTIONS = {
    "$__rate_interval": "30s",
    "$__interval": "1s",
    "$__range": "5m",
    "${datasource}": "prometheus",
}
ALL_VALUE = ".*"

BUDGETS = {
    "budgets": [
        # Team support (KEY_B) is over this at once: its requests are refused with 402.
        {"name": "support-tiny", "scope": {"team": "support"}, "limit_usd": "0.000001"},
        {"name": "search-daily", "scope": {"team": "search"}, "limit_usd": 5, "period": "day"},
        {"name": "everyone-monthly", "scope": {}, "limit_usd": 100, "period": "month"},
        {"name": "alice-rpm", "scope": {"user": "alice"}, "requests_per_minute": 10000},
    ]
}


# ----------------------------------------------------------------- dashboard JSON
def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))


def panel_targets(dash: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for p in iter_panels(dash["panels"]):
        for t in p.get("targets", []):
            yield p, t


def substitute(expr: str, variables: set[str]) -> str:
    for k, v in SUBSTITUTIONS.items():
        expr = expr.replace(k, v)
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", ALL_VALUE).replace("$" + name, ALL_VALUE)
    assert "$" not in expr, f"an unknown variable is left in {expr!r}"
    return expr


def variable_names(dash: dict[str, Any]) -> set[str]:
    return {v["name"] for v in dash["templating"]["list"]}


def test_there_are_the_three_dashboards() -> None:
    assert [p.name for p in DASHBOARD_FILES] == ["budgets.json", "proxy-health.json", "spend.json"]


#: Fields Grafana itself writes into exported dashboards that the published schema does
#: not model: the built-in annotation flag, and a query variable's display text.
SCHEMA_EXTRAS = re.compile(
    r"^\.annotations\.list\[\d+\]\.builtIn$|^\.templating\.list\[\d+\]\.definition$"
)


def _dropped(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Paths of ``ours`` missing from ``theirs`` (what a decoder did not know)."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return [f"{path} became {type(theirs).__name__}"]
        return [
            p
            for key, value in ours.items()
            for p in (
                [f"{path}.{key}"]
                if key not in theirs
                else _dropped(value, theirs[key], f"{path}.{key}")
            )
        ]
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(ours) != len(theirs):
            return [f"{path} lost items"]
        return [
            p
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
            for p in _dropped(a, b, f"{path}[{i}]")
        ]
    return []


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboard_round_trips_through_the_grafana_schema(path: Path) -> None:
    """Decoded by grafana-foundation-sdk (generated from Grafana's own dashboard schema)
    and encoded again, nothing is lost: every field we write is one the schema knows,
    spelled as it expects, apart from the two Grafana-written extras above."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    ours = json.loads(path.read_text())
    theirs = json.loads(JSONEncoder(sort_keys=True).encode(Dashboard.from_json(ours)))
    lost = [p for p in _dropped(ours, theirs) if not SCHEMA_EXTRAS.match(p)]
    assert not lost, lost
    assert len(theirs["panels"]) == len(ours["panels"])


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboard_json_has_the_grafana_schema_shape(path: Path) -> None:
    """A structural check of the fields Grafana's dashboard schema (v39+) requires."""
    dash = load(path)
    assert isinstance(dash["uid"], str) and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dash["uid"])
    assert isinstance(dash["title"], str) and dash["title"]
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 39
    assert "id" not in dash or dash["id"] is None  # provisioned dashboards carry no id
    assert isinstance(dash["time"]["from"], str) and isinstance(dash["time"]["to"], str)
    assert isinstance(dash["tags"], list)
    assert isinstance(dash["annotations"]["list"], list)
    variables = dash["templating"]["list"]
    names = [v["name"] for v in variables]
    assert REQUIRED_VARIABLES <= set(names), names
    assert len(names) == len(set(names))
    for v in variables:
        assert v["type"] in ("datasource", "query", "custom", "constant", "interval"), v
        if v["type"] == "datasource":
            assert v["query"] == "prometheus"
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert v["query"].startswith("label_values("), v["query"]
    ids = set()
    occupied: set[tuple[int, int]] = set()
    panels = list(iter_panels(dash["panels"]))
    assert panels
    for p in panels:
        assert isinstance(p["id"], int) and p["id"] not in ids, p.get("title")
        ids.add(p["id"])
        assert p["type"] in {"timeseries", "stat", "table", "bargauge", "gauge", "row", "text"}
        assert p["title"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("x", "y", "w", "h")), p["title"]
        assert 0 <= g["x"] and g["w"] >= 1 and g["x"] + g["w"] <= 24 and g["h"] >= 1
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert isinstance(p["fieldConfig"]["defaults"], dict)
        assert isinstance(p["fieldConfig"]["overrides"], list)
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert isinstance(t["expr"], str) and t["expr"].strip()
            used = set(re.findall(r"\$\{?(\w+)", t["expr"])) - {
                "__rate_interval",
                "__interval",
                "__range",
            }
            assert used <= set(names), f"{p['title']}: undefined variables {used - set(names)}"


def test_provisioning_files_point_at_the_dashboards() -> None:
    ds = yaml.safe_load((DASHBOARDS / "provisioning/datasources/prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    assert source["isDefault"] is True
    prov = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/metergate.yaml").read_text())
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    uids = [load(p)["uid"] for p in DASHBOARD_FILES]
    assert len(uids) == len(set(uids))


# --------------------------------------------------------------------- promtool
def promtool(*args: str) -> str:
    done = subprocess.run(
        [binary(PROMTOOL), *args], cwd=PROM_CONFIG, capture_output=True, text=True, timeout=60
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def test_promtool_checks_the_rules_and_the_example_config() -> None:
    assert "SUCCESS" in promtool("check", "rules", "rules.yml")
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")


def test_promtool_unit_tests_pass_and_cover_every_alerting_rule() -> None:
    assert "SUCCESS" in promtool("test", "rules", "rules.test.yml")
    rules = yaml.safe_load((PROM_CONFIG / "rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROM_CONFIG / "rules.test.yml").read_text())
    tested_firing = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == tested_firing, (
        f"alerting rules without a firing test: {alerts - tested_firing}"
    )
    alertmanager = yaml.safe_load((PROM_CONFIG / "alertmanager.yml").read_text())
    receivers = {r["name"]: r for r in alertmanager["receivers"]}
    assert receivers[alertmanager["route"]["receiver"]]["webhook_configs"][0]["url"]


# ------------------------------------------------- the real thing: proxy + Prometheus
async def _traffic(proxy: RunningProxy) -> None:
    """One round of requests through the real SDKs: plain, streamed, cut short (usage
    estimated by the proxy), failed upstream (500), and refused by a budget (team
    support)."""
    oa, an = proxy.openai(KEY_A), proxy.anthropic(KEY_A)
    cut = {"X-Fake-Fault": "cut"}
    gpt, claude = "gpt-4o-mini", "claude-haiku-4-5"
    hello: Any = [{"role": "user", "content": "Hello there"}]
    await oa.chat.completions.create(model=gpt, messages=hello)
    stream = await oa.chat.completions.create(model=gpt, messages=hello, stream=True)
    async for _ in stream:
        pass
    await an.messages.create(model=claude, max_tokens=64, messages=hello)
    async with an.messages.stream(model=claude, max_tokens=64, messages=hello) as s:
        await s.get_final_message()
    # A stream cut short surfaces in the SDK as a transport error mid-iteration.
    broken = (openai.APIError, anthropic.APIError, TransportError)
    with pytest.raises(broken):
        stream = await oa.chat.completions.create(
            model=gpt, messages=hello, stream=True, extra_headers=cut
        )
        async for _ in stream:
            pass
    with pytest.raises(broken):
        async with an.messages.stream(
            model=claude, max_tokens=64, messages=hello, extra_headers=cut
        ) as s:
            await s.get_final_message()
    with pytest.raises(openai.InternalServerError):  # the upstream fails: a 5xx
        await oa.chat.completions.create(
            model=gpt, messages=hello, extra_headers={"X-Fake-Fault": "status:500"}
        )
    with pytest.raises(openai.APIStatusError) as refused:
        await proxy.openai(KEY_B).chat.completions.create(model=gpt, messages=hello)
    assert refused.value.status_code == 402
    with pytest.raises(anthropic.APIStatusError) as refused_a:
        await proxy.anthropic(KEY_B).messages.create(model=claude, max_tokens=64, messages=hello)
    assert refused_a.value.status_code == 402


async def _wait_until_scraped(prom: PromServer, proxy: RunningProxy) -> None:
    """Until Prometheus holds the proxy's final request count, twice (two scrapes
    after the traffic, so every rate() over the traffic has its last points)."""
    want = metric_sum(proxy, "metergate_requests_total")
    deadline = time.monotonic() + 20
    seen = 0
    while seen < 2:
        got = await prom.query("sum(metergate_requests_total)")
        samples = await prom.query('count_over_time(up{job="metergate"}[1m])')
        if got and float(got[0]["value"][1]) == want and samples:
            seen += 1
        assert time.monotonic() < deadline, f"Prometheus never saw {want} requests: {got}"
        await asyncio.sleep(1.0)


async def test_every_panel_query_returns_data_from_a_real_prometheus(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await make_proxy(BUDGETS)
    prom = await start_prometheus(
        tmp_path / "prometheus",
        [proxy.url.removeprefix("http://")],
        rule_files=[PROM_CONFIG / "rules.yml"],
    )
    try:
        # Three rounds of traffic a second and a half apart: several scrapes see the
        # counters move, so rate() and histogram_quantile() have something to say.
        for i in range(3):
            await _traffic(proxy)
            if i < 2:
                await asyncio.sleep(1.5)
        await _wait_until_scraped(prom, proxy)
        assert metric_sum(proxy, "metergate_estimated_requests_total") >= 6
        assert metric_sum(proxy, "metergate_requests_total", status="refused_budget") == 6

        targets = (await prom.api("/api/v1/targets"))["activeTargets"]
        assert [t["health"] for t in targets] == ["up"], targets

        now = time.time()
        empty: list[str] = []
        checked = 0
        for path in DASHBOARD_FILES:
            dash = load(path)
            names = variable_names(dash)
            for panel, target in panel_targets(dash):
                expr = substitute(target["expr"], names)
                if target.get("instant"):
                    result: list[Any] = await prom.query(expr, at=now)
                else:
                    result = await prom.query_range(expr, now - 60, now, 1)
                checked += 1
                if not result:
                    empty.append(f"{path.name} / {panel['title']} / {target['refId']}: {expr}")
            for var in dash["templating"]["list"]:
                if var["type"] != "query":
                    continue
                m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"])
                assert m, var["query"]
                values = await prom.label_values(m[2], substitute(m[1], names))
                if not values:
                    empty.append(f"{path.name} / variable {var['name']}: {var['query']}")
        assert not empty, "queries without a series:\n" + "\n".join(empty)
        assert checked >= 40

        # The budget gauges as Prometheus scraped them: the shared store's values.
        spent = {
            r["metric"]["budget"]: float(r["value"][1])
            for r in await prom.query("metergate_budget_spent_usd")
        }
        assert set(spent) == {"support-tiny", "search-daily", "everyone-monthly"}
        assert spent["search-daily"] > 0 and spent["support-tiny"] == 0

        # The rules file, loaded by this Prometheus: every rule evaluates without error,
        # and the recording rules produce series from the real metrics.
        groups = (await prom.api("/api/v1/rules"))["groups"]
        rules = [r for g in groups for r in g["rules"]]
        in_file = yaml.safe_load((PROM_CONFIG / "rules.yml").read_text())["groups"]
        assert len(rules) == sum(len(g["rules"]) for g in in_file) == 20
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not bad, bad
        for record in (
            "metergate_budget:used_ratio",
            "metergate_budget:burn_rate_usd_per_second:1h",
            "metergate:cost_usd:rate5m",
            "metergate:upstream_error_ratio:rate5m",
        ):
            assert await prom.query(record), record
    finally:
        prom.stop()
