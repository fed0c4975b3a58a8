"""``/ui``: the sign-in flow and its cookie, the security headers, and the page itself
driven in Debian's headless Chromium (through playwright, with no browser download):
signed in, it must draw spend by team and by model and every budget's bar from what
the proxy really recorded for SDK traffic."""

from __future__ import annotations

import os
import shutil
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from playwright.async_api import ConsoleMessage, async_playwright

from proxy.admin_auth import SESSION_COOKIE, SESSION_TTL_S, AdminAuth
from proxy.ledger import LedgerRecord
from tests.conftest import KEY_A, KEY_B, ProxyFactory, RunningProxy

TOKEN = "admin-token-ui-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHROMIUM = Path("/usr/bin/chromium")
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello ui"}]}
CLAUDE = {
    "model": "claude-haiku-4-5",
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "hello ui"}],
}
BUDGETS = [
    # Soft, so these small limits never refuse the test's requests.
    {"name": "search-daily", "scope": {"team": "search"}, "limit_usd": "0.0002",
     "period": "day", "enforce": "soft"},
    {"name": "support-monthly", "scope": {"team": "support"}, "limit_usd": "25",
     "timezone": "Europe/Berlin"},
    {"name": "everything-total", "scope": {}, "limit_usd": "1", "period": "total"},
    {"name": "claude-rate", "scope": {"model": "claude-haiku-4-5"}, "requests_per_minute": 600},
]  # fmt: skip


async def send_traffic(proxy: RunningProxy) -> None:
    oa = proxy.openai(KEY_A)
    for _ in range(3):
        await oa.chat.completions.create(**CHAT, max_tokens=10)
    an = proxy.anthropic(KEY_B)
    for _ in range(2):
        await an.messages.create(**CLAUDE)
    await proxy.openai(KEY_B).chat.completions.create(**CHAT, max_tokens=10)


def history(now_ms: int) -> list[LedgerRecord]:
    """Earlier spend over the last day, written through the store's own API, so that the
    chart has more than one bar to draw (the SDK traffic all lands in the last hour)."""
    teams = [("search", "app-a", "gpt-4o"), ("support", "app-b", "claude-sonnet-4-5"),
             ("research", "app-c", "o3-mini")]  # fmt: skip
    records = []
    for hour in range(1, 23):
        for i, (team, key, model) in enumerate(teams):
            if (hour + i) % 3 == 0:
                continue
            records.append(
                LedgerRecord(
                    id=f"history-{hour}-{i}",
                    ts_ms=now_ms - hour * 3_600_000,
                    key_name=key,
                    team=team,
                    user=None,
                    end_user=None,
                    tags=(),
                    upstream="anthropic" if model.startswith("claude") else "openai",
                    endpoint="chat/completions",
                    model=model,
                    stream=False,
                    status=200,
                    input_tokens=1000 * hour,
                    cached_input_tokens=0,
                    cache_write_tokens=0,
                    output_tokens=200 * (i + 1),
                    reasoning_tokens=0,
                    cost_nanos=(1 + (hour * 7 + i * 5) % 11) * 1_000_000 * (i + 1),
                    exact=True,
                    latency_ms=100.0,
                )
            )
    return records


async def login(http: aiohttp.ClientSession, proxy: RunningProxy, token: str) -> Any:
    return await http.post(f"{proxy.url}/ui/login", data={"token": token}, allow_redirects=False)


def assert_security_headers(headers: Any) -> None:
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"


# -- without a browser ---------------------------------------------------------------------


async def test_the_page_is_off_without_an_admin_token(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    async with aiohttp.ClientSession() as http:
        for path in ("/ui", "/ui/ui.js", "/ui/login"):
            async with http.get(f"{proxy.url}{path}") as response:
                assert response.status == 404
                assert (await response.json())["error"]["code"] == "ui_disabled"


async def test_sign_in_sets_a_read_only_session_cookie(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"admin_token": TOKEN})
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(f"{proxy.url}/ui") as response:
            assert response.status == 200
            page = await response.text()
            assert 'action="/ui/login"' in page and 'type="password"' in page
            assert "<script" not in page  # the form needs no script at all
            assert_security_headers(response.headers)
        async with await login(http, proxy, "wrong-token") as response:
            assert response.status == 401
            assert "That is not the admin token." in await response.text()
            assert SESSION_COOKIE not in response.cookies
        async with await login(http, proxy, TOKEN) as response:
            assert response.status == 303 and response.headers["Location"] == "/ui"
            set_cookie = response.headers["Set-Cookie"]
            morsel = response.cookies[SESSION_COOKIE]
        assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
        assert "Path=/" in set_cookie and f"Max-Age={SESSION_TTL_S}" in set_cookie
        assert TOKEN not in set_cookie
        cookie = {"Cookie": f"{SESSION_COOKIE}={morsel.value}"}

        async def status(method: str, path: str, headers: dict[str, str]) -> int:
            async with http.request(method, f"{proxy.url}{path}", headers=headers) as response:
                return response.status

        # The page and the two endpoints it reads take the cookie...
        assert await status("GET", "/ui", cookie) == 200
        assert await status("GET", "/admin/spend", cookie) == 200
        assert await status("GET", "/admin/budgets", cookie) == 200
        # ...nothing else does: no change, no ledger, no document.
        for method, path in [
            ("GET", "/admin/ledger"),
            ("GET", "/admin/openapi.json"),
            ("GET", "/admin/budgets/x"),
            ("PUT", "/admin/budgets/x"),
            ("DELETE", "/admin/budgets/x"),
            ("POST", "/admin/budgets/x/reset"),
        ]:
            assert await status(method, path, cookie) == 401, (method, path)
        # A cookie that was not issued by this token is worthless.
        issued, _, mac = morsel.value.partition(".")
        other_mac = mac[:-1] + ("1" if mac.endswith("0") else "0")
        for forged in (f"{issued}.{other_mac}", f"{int(issued) + 1}.{mac}", TOKEN, "", "1.x"):
            forged_cookie = {"Cookie": f"{SESSION_COOKIE}={forged}"}
            assert await status("GET", "/admin/spend", forged_cookie) == 401
        # Bearer still works everywhere.
        assert await status("GET", "/admin/ledger", AUTH) == 200
        # A form posted from another site neither signs in nor out.
        async with http.post(
            f"{proxy.url}/ui/login",
            data={"token": TOKEN},
            headers={"Origin": "http://evil.example"},
            allow_redirects=False,
        ) as response:
            assert response.status == 403
            assert SESSION_COOKIE not in response.cookies
        async with http.post(
            f"{proxy.url}/ui/logout", headers=cookie, allow_redirects=False
        ) as response:
            assert response.status == 303
            assert response.cookies[SESSION_COOKIE].value == ""


async def test_static_files_carry_the_security_headers(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"admin_token": TOKEN})
    async with aiohttp.ClientSession() as http:
        for name, kind in (("ui.js", "text/javascript"), ("ui.css", "text/css")):
            async with http.get(f"{proxy.url}/ui/{name}") as response:
                assert response.status == 200
                assert response.content_type == kind
                assert_security_headers(response.headers)
        async with http.get(f"{proxy.url}/ui/other.js") as response:
            assert response.status == 404
        async with http.get(f"{proxy.url}/ui/", allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == "/ui"


def test_a_session_expires_and_changing_the_token_ends_it() -> None:
    now = [1_800_000_000.0]
    auth = AdminAuth(TOKEN, clock=lambda: now[0])
    value = auth.new_session()

    def request() -> Any:
        return make_mocked_request("GET", "/admin/spend", {"Cookie": f"{SESSION_COOKIE}={value}"})

    assert auth.session_ok(request())
    now[0] += SESSION_TTL_S - 1
    assert auth.session_ok(request())
    now[0] += 2
    assert not auth.session_ok(request())
    assert not AdminAuth("another-token-0123456789", clock=lambda: now[0] - 10).session_ok(
        request()
    )


def chromium_path() -> str:
    """Debian's Chromium; the test fails (never skips) without it."""
    assert CHROMIUM.exists(), (
        "tests/test_ui.py needs Debian's Chromium at /usr/bin/chromium: "
        "apt-get install chromium (scripts/test.sh does it)."
    )
    return str(CHROMIUM)


def keep_screenshot(shot: Path) -> None:
    """Check the screenshot, and copy it to $METERGATE_SCREENSHOT_DIR when set."""
    assert shot.stat().st_size > 10_000
    target = os.environ.get("METERGATE_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / "ui.png")


# -- in Chromium ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_the_page_draws_spend_and_budgets_in_chromium(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    chromium = chromium_path()
    proxy = await make_proxy({"admin_token": TOKEN, "budgets": BUDGETS})
    await send_traffic(proxy)
    await proxy.store.append_ledger(history(time.time_ns() // 1_000_000))
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(f"{proxy.url}/admin/budgets") as response:
            budgets = {b["name"]: b for b in (await response.json())["budgets"]}
        async with http.get(f"{proxy.url}/admin/spend?group_by=&since=24h") as response:
            total = (await response.json())["total"]

    problems: list[str] = []
    urls: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            problems.append(message.text)

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = await browser.new_page(
                viewport={"width": 1200, "height": 900}, timezone_id="UTC", locale="en-GB"
            )
            page.on("console", on_console)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on("request", lambda r: urls.append(r.url))
            await page.goto(f"{proxy.url}/ui")
            await page.fill("#token", TOKEN)
            await page.click("button[type=submit]")
            await page.wait_for_selector("#chart-team[data-state=ready] rect", timeout=20_000)
            await page.wait_for_selector("#chart-model[data-state=ready] rect", timeout=20_000)
            await page.wait_for_selector("#budgets[data-state=ready] .budget", timeout=20_000)

            cookies = await page.context.cookies()
            session = next(c for c in cookies if c["name"] == SESSION_COOKIE)
            assert session["httpOnly"] and session["sameSite"] == "Strict"
            assert await page.evaluate("document.cookie") == ""  # invisible to scripts

            teams = await page.locator("#legend-team .group-name").all_text_contents()
            assert set(teams) == {"search", "support", "research"}
            models = await page.locator("#legend-model .group-name").all_text_contents()
            assert {"gpt-4o-mini", "claude-haiku-4-5", "gpt-4o", "o3-mini"} <= set(models)
            # Several hours of history: several bars, in several colours.
            assert await page.locator("#chart-team rect.seg").count() >= 20
            totals = await page.locator("#totals .value").all_text_contents()
            assert totals[1] == f"{total['requests']:,}"
            spend = Decimal(total["cost_usd"]).quantize(Decimal("0.01"), rounding="ROUND_DOWN")
            assert totals[0] == f"${spend:,}"

            for name, budget in budgets.items():
                item = page.locator(f'.budget[data-name="{name}"]')
                text = await item.inner_text()
                assert name in text
                if budget["limit_nanos"] is None:
                    assert "600 requests/min" in text
                    continue
                assert await item.locator(".pct").inner_text() == f"{budget['percent_spent']:.2f}%"
                assert budget["spent_nanos"] > 0
                if budget["period_reset"] is None:
                    assert "never resets (total)" in text
                else:
                    day, clock = budget["period_reset"][:10], budget["period_reset"][11:16]
                    assert f"resets {day} {clock}" in text and budget["timezone"] in text
                classes = (await item.get_attribute("class") or "").split()
                assert ("over" in classes) == (budget["percent_spent"] >= 100)
            assert problems == [], problems  # no script error, no CSP violation

            shot = tmp_path / "ui.png"
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            await browser.close()
    keep_screenshot(shot)
    # The page asked nothing of any other origin.
    assert urls and all(url.startswith(f"{proxy.url}/") for url in urls), urls
