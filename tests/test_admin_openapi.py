"""``/admin/openapi.json``: a valid OpenAPI 3.1 document that describes every admin
route the proxy registers, and that schemathesis can use against a real proxy (over
HTTP, with SDK traffic in its ledger) without finding a single 500."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import hypothesis
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from proxy.admin_openapi import FRAGMENTS, build_openapi
from tests.conftest import KEY_A, KEY_B, ProxyFactory, RunningProxy

TOKEN = "admin-token-openapi-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BUDGETS = [
    # search-monthly is the document's example name, so explicit examples hit a real one.
    {"name": "search-monthly", "scope": {"team": "search"}, "limit_usd": "50"},
    {"name": "all-monthly", "scope": {}, "limit_usd": "500", "period": "month"},
]
MAX_EXAMPLES = 25  # per operation and generation mode
FUZZ_SECONDS = 150  # a bound on the whole schemathesis run


async def fetch_document(proxy: RunningProxy) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{proxy.url}/admin/openapi.json", headers=AUTH) as response,
    ):
        return response.status, orjson.loads(await response.read())


def admin_routes(proxy: RunningProxy) -> set[tuple[str, str]]:
    """``(METHOD, path)`` of every admin route the app registered, apart from the
    catch-all ones that answer 404."""
    routes = set()
    for resource in proxy.app.router.resources():
        path = resource.canonical
        if not path.startswith("/admin/") or "{tail}" in path:
            continue
        for route in resource:
            if route.method != "HEAD":
                routes.add((route.method, path))
    return routes


async def test_the_document_is_valid_openapi_3_1(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"admin_token": TOKEN})
    status, document = await fetch_document(proxy)
    assert status == 200
    validate(document)  # raises on any error
    assert document["openapi"] == "3.1.0"
    assert document == orjson.loads(orjson.dumps(build_openapi()))
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["bearer"]["description"],
    }
    assert document["security"] == [{"bearer": []}]
    error = document["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["message", "code"]


async def test_the_document_describes_every_admin_route(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"admin_token": TOKEN})
    _, document = await fetch_document(proxy)
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert documented == admin_routes(proxy)
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            assert op["operationId"] and op["summary"], (method, path)
            assert "401" in op["responses"], (method, path)
            for status, response in op["responses"].items():
                if not status.startswith("2"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path)


def test_a_path_or_schema_defined_twice_is_refused() -> None:
    paths, schemas = FRAGMENTS[0]
    with pytest.raises(ValueError, match="OpenAPI path"):
        build_openapi([*FRAGMENTS, (paths, {})])
    with pytest.raises(ValueError, match="OpenAPI schema"):
        build_openapi([*FRAGMENTS, ({}, schemas)])


async def test_the_document_needs_the_token_and_is_off_without_one(
    make_proxy: ProxyFactory,
) -> None:
    on = await make_proxy({"admin_token": TOKEN})
    off = await make_proxy()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{on.url}/admin/openapi.json") as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "unauthorized"
        async with http.get(f"{off.url}/admin/openapi.json", headers=AUTH) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "admin_disabled"


# -- schemathesis against a real proxy ------------------------------------------------------


def runner(
    operation: Any, mode: GenerationMode, base_url: str, session: requests.Session, calls: list[Any]
) -> Any:
    """A hypothesis test that calls ``operation`` with generated cases and checks each
    answer: never a 5xx; for valid requests, also the documented response schema."""
    checks = [not_a_server_error]
    if mode is GenerationMode.POSITIVE:
        checks.append(schemathesis.checks.response_schema_conformance)

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        calls.append(case)
        case.call_and_validate(
            base_url=base_url, session=session, headers=AUTH, checks=checks, timeout=10
        )

    return run


def fuzz(base_url: str) -> list[str]:
    """Run every documented operation ``MAX_EXAMPLES`` times in each generation mode;
    return the failures (a 500, a crash, or, for valid requests, an answer that does not
    match the document). Runs in a thread: the proxy serves on the test's event loop."""
    session = requests.Session()
    session.trust_env = False  # loopback only, whatever proxy variables say
    schema = schemathesis.openapi.from_url(f"{base_url}/admin/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = {
        f"{method.upper()} {path}"
        for path, item in orjson.loads(
            session.get(f"{base_url}/admin/openapi.json", headers=AUTH).content
        )["paths"].items()
        for method in item
        if method != "parameters"
    }
    # Schemathesis leaves out the document's own URL; the tests above cover it.
    assert {op.label for op in operations} == documented - {"GET /admin/openapi.json"}
    failures: list[str] = []
    calls: list[Any] = []
    deadline = time.monotonic() + FUZZ_SECONDS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for operation in operations:
            if time.monotonic() > deadline:
                failures.append(f"out of time before {operation.label} ({mode.value})")
                return failures
            try:
                runner(operation, mode, base_url, session, calls)()
            except Exception as exc:  # a failed check, or the proxy dropped the connection
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    # Each operation was really exercised (not filtered away by hypothesis).
    assert len(calls) >= len(operations) * 2 * 5, len(calls)
    return failures


@pytest.mark.timeout(FUZZ_SECONDS + 60)
async def test_schemathesis_finds_no_server_errors(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"admin_token": TOKEN, "budgets": BUDGETS})
    await proxy.openai(KEY_A).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    await proxy.anthropic(KEY_B).messages.create(
        model="claude-haiku-4-5", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
    )
    failures = await asyncio.to_thread(fuzz, proxy.url)
    assert failures == [], "\n\n".join(failures)
    # The proxy is still up and still answers its own document.
    status, _ = await fetch_document(proxy)
    assert status == 200
