"""``/admin/spend`` and ``/admin/ledger``: real traffic through the SDKs, then the API
must give exactly what the ledger holds (integer nanos and exact decimal text), the
same rows as ``metergate report``, and useful 400s for queries it cannot answer."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.ledger import LedgerRecord
from proxy.report import format_report
from tests.conftest import KEY_A, KEY_B, ProxyFactory, RunningProxy

TOKEN = "admin-token-spend-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello spend"}]}
CLAUDE = {
    "model": "claude-haiku-4-5",
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "hello spend"}],
}
HOUR_MS = 3_600_000


async def send_traffic(proxy: RunningProxy) -> list[str]:
    """Requests from both SDKs, two teams, streamed and not, tagged and not; returns
    the request ids the proxy answered with."""
    ids = []
    oa = proxy.openai(KEY_A)
    raw = await oa.chat.completions.with_raw_response.create(**CHAT, max_tokens=10)
    ids.append(raw.headers["x-metergate-request-id"])
    raw = await oa.chat.completions.with_raw_response.create(
        **CHAT, max_tokens=20, extra_headers={"X-Metergate-Tags": "exp,nightly"}
    )
    ids.append(raw.headers["x-metergate-request-id"])
    stream = await oa.chat.completions.create(**CHAT, max_tokens=10, stream=True)
    async for _ in stream:
        pass
    an = proxy.anthropic(KEY_B)
    for _ in range(2):
        raw_an = await an.messages.with_raw_response.create(**CLAUDE)
        ids.append(raw_an.headers["x-metergate-request-id"])
    raw = await proxy.openai(KEY_B).chat.completions.with_raw_response.create(**CHAT, max_tokens=5)
    ids.append(raw.headers["x-metergate-request-id"])
    return ids


@pytest.fixture
async def traffic(make_proxy: ProxyFactory) -> AsyncIterator[tuple[RunningProxy, list[str]]]:
    proxy = await make_proxy({"admin_token": TOKEN})
    ids = await send_traffic(proxy)
    yield proxy, ids


async def get(proxy: RunningProxy, path: str, **params: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{proxy.url}{path}", params=params or None, headers=AUTH) as response,
    ):
        return response.status, orjson.loads(await response.read())


def usd_of(nanos: int) -> Decimal:
    return Decimal(nanos) / 10**9


def expected_by(records: list[LedgerRecord], column: str) -> dict[str, list[int]]:
    """[requests, input, output, cost] per value of ``column``, summed here by hand."""
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for r in records:
        values = {
            "team": [r.team or "(none)"],
            "model": [r.model],
            "key": [r.key_name],
            "tag": list(dict.fromkeys(r.tags)) or ["(none)"],
        }[column]
        for value in values:
            acc = sums[value]
            acc[0] += 1
            acc[1] += r.input_tokens
            acc[2] += r.output_tokens
            acc[3] += r.cost_nanos
    return dict(sums)


def check_sums(item: dict[str, Any], expected: list[int]) -> None:
    assert [
        item["requests"],
        item["input_tokens"],
        item["output_tokens"],
        item["cost_nanos"],
    ] == expected
    assert Decimal(item["cost_usd"]) == usd_of(item["cost_nanos"])


@pytest.mark.parametrize("column", ["team", "model", "key", "tag"])
async def test_spend_by_one_column_equals_the_ledger(
    traffic: tuple[RunningProxy, list[str]], column: str
) -> None:
    proxy, _ = traffic
    records = await proxy.store.ledger_records()
    assert len(records) == 6 and all(r.cost_nanos > 0 for r in records)
    status, body = await get(proxy, "/admin/spend", group_by=column)
    assert status == 200, body
    expected = expected_by(records, column)
    assert {row[column] for row in body["rows"]} == set(expected)
    for row in body["rows"]:
        check_sums(row, expected[row[column]])
    total = sum(r.cost_nanos for r in records)
    if column != "tag":  # a request with two tags counts under both
        assert body["total"]["cost_nanos"] == total
        assert body["total"]["requests"] == 6


@pytest.mark.parametrize("group_by", ["", "team", "team,model", "upstream,key,status", "tag,day"])
async def test_spend_rows_are_the_reports_rows(
    traffic: tuple[RunningProxy, list[str]], group_by: str
) -> None:
    proxy, _ = traffic
    columns = [c for c in group_by.split(",") if c]
    report = orjson.loads(format_report(await proxy.store.report(columns), columns, "json"))
    status, body = await get(proxy, "/admin/spend", group_by=group_by)
    assert status == 200, body
    assert body["group_by"] == columns
    assert body["rows"] == report["rows"]
    assert body["total"] == report["total"]


async def test_the_default_grouping_is_by_team_like_the_cli(
    traffic: tuple[RunningProxy, list[str]],
) -> None:
    proxy, _ = traffic
    status, body = await get(proxy, "/admin/spend")
    assert status == 200
    assert body["group_by"] == ["team"]
    assert {row["team"] for row in body["rows"]} == {"search", "support"}


async def test_filters_keep_only_matching_records(
    traffic: tuple[RunningProxy, list[str]],
) -> None:
    proxy, _ = traffic
    records = await proxy.store.ledger_records()

    async def cost(params: list[tuple[str, str]]) -> tuple[int, int]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{proxy.url}/admin/spend", params=params, headers=AUTH) as response,
        ):
            body = await response.json()
            assert response.status == 200, body
            return body["total"]["requests"], body["total"]["cost_nanos"]

    def want(pred: Any) -> tuple[int, int]:
        chosen = [r for r in records if pred(r)]
        return len(chosen), sum(r.cost_nanos for r in chosen)

    assert await cost([("group_by", ""), ("team", "search")]) == want(lambda r: r.team == "search")
    assert await cost([("model", "claude-haiku-4-5")]) == want(lambda r: r.upstream == "anthropic")
    assert await cost([("upstream", "openai"), ("team", "support")]) == want(
        lambda r: r.upstream == "openai" and r.team == "support"
    )
    assert await cost([("tag", "nightly")]) == want(lambda r: "nightly" in r.tags)
    assert await cost([("tag", "batch"), ("tag", "exp")]) == want(
        lambda r: "batch" in r.tags or "exp" in r.tags
    )
    assert await cost([("tag", "(none)")]) == want(lambda r: not r.tags)
    assert await cost([("key", "app-b"), ("user", "bob")]) == want(lambda r: r.key_name == "app-b")
    assert await cost([("team", "nobody")]) == (0, 0)


async def test_buckets_split_each_row_in_time_and_add_up(
    traffic: tuple[RunningProxy, list[str]],
) -> None:
    proxy, _ = traffic
    records = await proxy.store.ledger_records()
    status, body = await get(proxy, "/admin/spend", group_by="team", since="3h", bucket="1h")
    assert status == 200, body
    assert body["bucket_ms"] == HOUR_MS
    starts = body["buckets"]
    # Aligned on whole hours, contiguous, covering the period from since to now.
    assert all(s % HOUR_MS == 0 for s in starts)
    assert [b - a for a, b in itertools.pairwise(starts)] == [HOUR_MS] * (len(starts) - 1)
    assert starts[0] <= body["since_ms"] < starts[0] + HOUR_MS
    assert len(starts) in (3, 4)
    for row in body["rows"]:
        points = row["series"]
        assert [p["start_ms"] for p in points] == starts
        for name in ("requests", "input_tokens", "output_tokens", "cost_nanos"):
            assert sum(p[name] for p in points) == row[name]
        for p in points:
            in_bucket = [
                r
                for r in records
                if r.team == row["team"] and p["start_ms"] <= r.ts_ms < p["start_ms"] + HOUR_MS
            ]
            assert p["cost_nanos"] == sum(r.cost_nanos for r in in_bucket)
            assert Decimal(p["cost_usd"]) == usd_of(p["cost_nanos"])


async def test_a_bucket_without_since_spans_the_records(
    traffic: tuple[RunningProxy, list[str]],
) -> None:
    proxy, _ = traffic
    status, body = await get(proxy, "/admin/spend", group_by="model", bucket="1d")
    assert status == 200, body
    assert body["since"] is None and len(body["buckets"]) in (1, 2)
    total = sum(r.cost_nanos for r in await proxy.store.ledger_records())
    assert sum(p["cost_nanos"] for row in body["rows"] for p in row["series"]) == total


async def test_one_ledger_record_by_request_id(traffic: tuple[RunningProxy, list[str]]) -> None:
    proxy, ids = traffic
    for request_id in ids:
        status, body = await get(proxy, f"/admin/ledger/{request_id}")
        assert status == 200, body
        record = await proxy.store.get_ledger_record(request_id)
        assert record is not None
        expected = orjson.loads(orjson.dumps(record.to_dict()))
        assert {k: v for k, v in body.items() if k not in ("cost_usd", "time")} == expected
        assert Decimal(body["cost_usd"]) == usd_of(record.cost_nanos)
    status, body = await get(proxy, "/admin/ledger/no-such-request")
    assert status == 404
    assert body["error"]["code"] == "not_found"


async def test_the_ledger_listing_is_bounded_and_newest_first(
    traffic: tuple[RunningProxy, list[str]],
) -> None:
    proxy, _ = traffic
    records = await proxy.store.ledger_records()
    status, body = await get(proxy, "/admin/ledger", limit="4")
    assert status == 200, body
    assert body["matched"] == 6 and body["truncated"] is True and body["limit"] == 4
    assert [r["id"] for r in body["records"]] == [r.id for r in records[::-1][:4]]
    status, body = await get(proxy, "/admin/ledger", since="1d", team="support")
    assert status == 200
    assert body["truncated"] is False
    assert {r["team"] for r in body["records"]} == {"support"}
    assert sum(r["cost_nanos"] for r in body["records"]) == sum(
        r.cost_nanos for r in records if r.team == "support"
    )


@pytest.mark.parametrize(
    ("path", "params", "words"),
    [
        ("/admin/spend", {"group_by": "colour"}, "Cannot group a report by 'colour'"),
        ("/admin/spend", {"group_by": "team,team"}, "listed twice"),
        ("/admin/spend", {"since": "yesterday"}, "Cannot read since 'yesterday'"),
        ("/admin/spend", {"since": "1d", "from": "2026-01-01"}, "either since or from"),
        ("/admin/spend", {"since": "1h", "until": "2h"}, "is not before until"),
        ("/admin/spend", {"bucket": "hourly"}, "Cannot read bucket"),
        ("/admin/spend", {"bucket": "0m"}, "Cannot read bucket"),
        ("/admin/spend", {"since": "30d", "bucket": "1s"}, "the most is 2000"),
        ("/admin/ledger", {"limit": "0"}, "limit must be a whole number from 1 to 1000"),
        ("/admin/ledger", {"limit": "5000"}, "limit must be a whole number from 1 to 1000"),
    ],
)
async def test_queries_that_cannot_be_answered_are_400s_that_say_why(
    make_proxy: ProxyFactory, path: str, params: dict[str, str], words: str
) -> None:
    proxy = await make_proxy({"admin_token": TOKEN})
    status, body = await get(proxy, path, **params)
    assert status == 400
    assert body["error"]["code"] == "invalid_query"
    assert words in body["error"]["message"]


async def test_the_read_api_needs_the_token_and_is_off_without_one(
    make_proxy: ProxyFactory,
) -> None:
    on = await make_proxy({"admin_token": TOKEN})
    off = await make_proxy()
    async with aiohttp.ClientSession() as http:
        for path in ("/admin/spend", "/admin/ledger", "/admin/ledger/x"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                async with http.get(f"{on.url}{path}", headers=headers) as response:
                    assert response.status == 401
                    assert (await response.json())["error"]["code"] == "unauthorized"
            async with http.get(f"{off.url}{path}", headers=AUTH) as response:
                assert response.status == 404
                assert (await response.json())["error"]["code"] == "admin_disabled"


async def test_a_series_too_large_to_answer_is_a_400(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"admin_token": TOKEN})
    # 60 users with one record each: 60 groups, times the number of buckets.
    records = [
        LedgerRecord(
            id=f"r{i}", ts_ms=1_700_000_000_000 + i, key_name="k", team=None, user=f"u{i}",
            end_user=None, tags=(), upstream="openai", endpoint="chat/completions",
            model="gpt-4o-mini", stream=False, status=200, input_tokens=1,
            cached_input_tokens=0, cache_write_tokens=0, output_tokens=1,
            reasoning_tokens=0, cost_nanos=i + 1, exact=True, latency_ms=1.0,
        )
        for i in range(60)
    ]  # fmt: skip
    await proxy.store.append_ledger(records)
    window = {"from": "2023-11-14T22:00Z", "until": "2023-11-15T08:40Z"}  # 640 minutes
    status, body = await get(proxy, "/admin/spend", group_by="user", bucket="1m", **window)
    assert status == 200 and len(body["buckets"]) == 640  # 38,400 points
    assert sum(p["cost_nanos"] for row in body["rows"] for p in row["series"]) == 1830
    status, body = await get(
        proxy, "/admin/spend", group_by="user", bucket="30s", **window
    )  # 76,800 points
    assert status == 400
    assert "the most is 50000 points" in body["error"]["message"]
