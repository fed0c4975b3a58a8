"""No secret leaves the proxy: provider keys, Metergate keys (static and issued), the
admin token and the key secret never appear in any output of a run.

One ``metergate serve`` process at DEBUG log level takes every kind of traffic the
proxy sees (both SDKs, streams, unknown and revoked keys, a budget refusal, upstream
errors and faults, the admin API, a scrape), and the CLI reads the store afterwards.
Then every output is searched for every secret: the process's log, every response
(status line, headers, body) but the one that hands out the issued key, the metrics
text, the CLI's output, and the raw bytes of the store and journal files.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import yaml

from tests.conftest import KEY_A, KEY_B, UPSTREAM_KEY_ANTHROPIC, UPSTREAM_KEY_OPENAI, base_config
from tests.fake_upstream import FakeUpstream
from tests.test_budget_replicas import METERGATE, MODEL, free_tcp_port

ADMIN_TOKEN = "admin-token-0f9e8d7c6b5a49382716"
KEY_SECRET = "key-secret-1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d"
PASSTHROUGH_KEY = "sk-callers-own-provider-key-77aa"
WRONG_KEY = "mg-not-a-real-key-but-still-secret-9911"
ANTHROPIC_MODEL = "claude-3-5-haiku-20241022"


def _secrets(issued: list[str]) -> dict[str, str]:
    return {
        "openai upstream key": UPSTREAM_KEY_OPENAI,
        "anthropic upstream key": UPSTREAM_KEY_ANTHROPIC,
        "static key A": KEY_A,
        "static key B": KEY_B,
        "admin token": ADMIN_TOKEN,
        "key secret": KEY_SECRET,
        "passthrough key": PASSTHROUGH_KEY,
        "unknown key": WRONG_KEY,
        **{f"issued key {i}": k for i, k in enumerate(issued)},
    }


@pytest.mark.timeout(180)
async def test_no_secret_in_any_output(fake: FakeUpstream, tmp_path: Path) -> None:
    port = free_tcp_port()
    config = base_config(fake.url, f"sqlite:///{tmp_path}/ledger.db")
    config["server"]["port"] = port
    config.update(
        admin_token=ADMIN_TOKEN,
        key_secret=KEY_SECRET,
        passthrough_keys=True,
        journal_dir=str(tmp_path / "journal"),
        budgets=[
            {"name": "tiny", "scope": {"key": "app-b"}, "limit_usd": "0.000001", "period": "day"}
        ],
    )
    config_path = tmp_path / "metergate.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "serve.log"
    outputs: dict[str, str] = {}
    issued: list[str] = []
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*METERGATE, "serve", "--config", str(config_path), "--log-level", "DEBUG"],
            cwd=tmp_path,
            stdout=log,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(url, proc, log_path)
        issued_key = await _drive(url, outputs, issued)
        # Revoked now (after a rotation): its use is refused, and must not echo it.
        await _admin(url, "DELETE", f"/admin/keys/{issued_key}", outputs, "revoke")
        await _wait_refused(url, issued[-1], outputs)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
    outputs.update(await asyncio.to_thread(_offline_outputs, tmp_path, config_path, log_path))
    assert "metergate ready" in outputs["serve log"]

    leaks = [
        f"{secret_name} in {where}"
        for secret_name, secret in _secrets(issued).items()
        for where, text in outputs.items()
        if secret in text
    ]
    assert not leaks, leaks
    # The run really exercised the paths whose outputs were searched.
    assert len(fake.records) >= 6
    assert any("ledger.db" in where for where in outputs)


def _offline_outputs(tmp_path: Path, config_path: Path, log_path: Path) -> dict[str, str]:
    """The serve log, the CLI's answers on the store, and every file the run wrote."""
    outputs = {"serve log": log_path.read_text(errors="replace")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERGATE_")}
    for name, args in {
        "report": ["report", "--by", "key,team", "--since", "1d"],
        "ledger list": ["ledger", "list", "--since", "1d"],
        "keys list": ["keys", "list", "--all", "--json"],
        "budgets list": ["budgets", "list"],
    }.items():
        done = subprocess.run(
            [sys.executable, "-m", "proxy.cli", *args, "--config", str(config_path)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, (name, done.stderr)
        outputs[f"cli {name}"] = done.stdout + done.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file() and path not in (config_path, log_path):
            outputs[f"file {path.relative_to(tmp_path)}"] = path.read_bytes().decode("latin-1")
    return outputs


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(600):
            if proc.poll() is not None:
                raise AssertionError(f"serve exited:\n{_tail(log_path)}")
            try:
                async with s.get(f"{url}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"serve did not become ready:\n{_tail(log_path)}")


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-4000:]


def _record(outputs: dict[str, str], name: str, status: int, headers: Any, body: str) -> None:
    head = "\n".join(f"{k}: {v}" for k, v in headers.items())
    outputs[name] = f"{status}\n{head}\n\n{body}"


async def _admin(
    url: str, method: str, path: str, outputs: dict[str, str], name: str, **kw: Any
) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method, url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, **kw
        ) as r,
    ):
        body = await r.text()
        _record(outputs, f"admin {name}", r.status, r.headers, body)
        assert r.status < 500, (name, body)
        return await r.json() if r.content_type == "application/json" else body


async def _drive(url: str, outputs: dict[str, str], issued: list[str]) -> str:
    """Every kind of request; returns the issued key's id."""
    # Issue a key: its value is in this one answer only, which is therefore not searched.
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{url}/admin/keys",
            json={"name": "app-issued", "team": "search"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as r,
    ):
        assert r.status == 201, await r.text()
        created = await r.json()
    issued.append(created["key"])
    key_id = created["id"]

    async def capture(name: str, call: Any) -> None:
        try:
            result = await call
            raw = getattr(result, "http_response", None)
            outputs[name] = repr(result) if raw is None else raw.text
        except (openai.APIError, anthropic.APIError) as exc:
            response = getattr(exc, "response", None)
            body = response.text if response is not None else ""
            headers = dict(response.headers) if response is not None else {}
            _record(outputs, name, getattr(exc, "status_code", 0), headers, body + str(exc))

    msgs = [{"role": "user", "content": "hello"}]
    for key in (KEY_A, issued[0], PASSTHROUGH_KEY, WRONG_KEY, KEY_B):
        oa = openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=key, max_retries=0)
        an = anthropic.AsyncAnthropic(base_url=f"{url}/anthropic", api_key=key, max_retries=0)
        try:
            raw = await oa.chat.completions.with_raw_response.create(
                model=MODEL, messages=msgs, max_tokens=5
            )
            _record(outputs, f"openai {key[:6]} body", raw.status_code, raw.headers, raw.text)
        except openai.APIStatusError as exc:
            _record(
                outputs, f"openai {key[:6]} error", exc.status_code, exc.response.headers,
                exc.response.text,
            )  # fmt: skip
        except openai.APIError as exc:
            outputs[f"openai {key[:6]} error"] = str(exc)

        async def stream_once(client: openai.AsyncOpenAI = oa) -> str:
            stream = await client.chat.completions.create(
                model=MODEL, messages=msgs, max_tokens=5, stream=True
            )
            return "".join([repr(chunk) async for chunk in stream])

        await capture(f"openai {key[:6]} stream", stream_once())
        await capture(
            f"anthropic {key[:6]}",
            an.messages.create(model=ANTHROPIC_MODEL, messages=msgs, max_tokens=5),
        )
        for fault in ("html", "reset", "error:500"):
            await capture(
                f"openai {key[:6]} fault {fault}",
                oa.chat.completions.create(
                    model=MODEL,
                    messages=msgs,
                    max_tokens=5,
                    extra_headers={"X-Fake-Fault": fault},
                ),
            )
        await oa.close()
        await an.close()

    await _admin(url, "GET", "/admin/budgets", outputs, "budgets")
    await _admin(url, "GET", "/admin/keys?all=1", outputs, "keys")
    await _admin(url, "GET", f"/admin/keys/{key_id}", outputs, "key")
    await _admin(url, "POST", f"/admin/keys/{key_id}/rotate", outputs, "rotate")
    issued.append(json.loads(outputs["admin rotate"].split("\n\n", 1)[1])["key"])
    del outputs["admin rotate"]  # the one answer that carries the rotated key
    await _admin(url, "GET", "/admin/openapi.json", outputs, "openapi")
    async with aiohttp.ClientSession() as s, s.get(f"{url}/admin/budgets") as r:
        _record(outputs, "admin without token", r.status, r.headers, await r.text())
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        outputs["metrics"] = await r.text()
    return key_id


async def _wait_refused(url: str, key: str, outputs: dict[str, str]) -> None:
    oa = openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=key, max_retries=0)
    try:
        for _ in range(40):
            try:
                await oa.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5
                )
            except openai.AuthenticationError as exc:
                _record(outputs, "revoked key", 401, exc.response.headers, exc.response.text)
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the revoked key was still accepted")
    finally:
        await oa.close()
