"""Property test of the request path: whatever a client sends over HTTP (methods, paths,
keys, tags, JSON of the wrong shape, bytes that are not JSON, streaming flags of the
wrong type), the proxy answers with a status below 500 of its own making, in a body an
SDK can parse, records every request it forwarded, and keeps serving (every example is answered by
the same proxy).

A 5xx is allowed only when it is the fake upstream's own answer, relayed (the fake
answers some hostile bodies with an error, as a provider would).
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import KEY_A, KEY_B, RunningProxy
from tests.fake_upstream import FakeUpstream

FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _dumps(value: Any) -> bytes:
    """JSON as a client might send it: integers beyond 64 bits included."""
    return json.dumps(value).encode()


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
MODELS = st.one_of(
    st.sampled_from(["gpt-4o-mini", "gpt-4o", "o3-mini", "claude-3-5-haiku-20241022"]),
    st.sampled_from(["ft:gpt-4o-mini:org::x", "gpt-4o-2024-08-06", "no-such-model", ""]),
    SCALARS,
)
MESSAGES = st.one_of(
    st.just([{"role": "user", "content": "hi"}]),
    st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "assistant", "system", "tool", 7]),
                "content": JSONISH,
            }
        ),
        max_size=3,
    ),
    JSONISH,
)
BODIES = st.one_of(
    st.fixed_dictionaries(
        {"model": MODELS, "messages": MESSAGES},
        optional={
            "max_tokens": SCALARS,
            "max_completion_tokens": SCALARS,
            "max_output_tokens": SCALARS,
            "stream": st.one_of(st.booleans(), SCALARS),
            "stream_options": JSONISH,
            "input": JSONISH,
            "prompt": JSONISH,
            "n": SCALARS,
            "tools": JSONISH,
        },
    ).map(_dumps),
    JSONISH.map(_dumps),
    st.binary(max_size=300),
)
PATHS = st.one_of(
    st.sampled_from(
        [
            "/openai/v1/chat/completions",
            "/openai/v1/responses",
            "/openai/v1/completions",
            "/openai/v1/embeddings",
            "/openai/v1/models",
            "/anthropic/v1/messages",
            "/anthropic/v1/messages/count_tokens",
            "/nope/v1/chat/completions",
            "/openai",
            "/",
        ]
    ),
    st.builds(
        lambda up, rest: f"/{up}/{rest}",
        st.sampled_from(["openai", "anthropic"]),
        st.text(alphabet=st.sampled_from("abcv1/._-~%2eE?=&"), min_size=0, max_size=30),
    ),
)
KEYS = st.sampled_from([KEY_A, KEY_B, "mg-unknown-key-000000", "sk-not-ours", "", " "])
TAGS = st.one_of(
    st.none(),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
)
REQUESTS = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE"]),
        "path": PATHS,
        "body": BODIES,
        "key": KEYS,
        "key_header": st.sampled_from(["Authorization", "x-api-key"]),
        "tags": TAGS,
    }
)


@FUZZ
@given(req=REQUESTS)
async def test_any_request_gets_a_parseable_answer_below_500(
    fake: FakeUpstream, proxy: RunningProxy, req: dict[str, Any]
) -> None:
    headers = {"Content-Type": "application/json"}
    if req["key_header"] == "Authorization":
        headers["Authorization"] = f"Bearer {req['key']}"
    else:
        headers["x-api-key"] = req["key"]
    if req["tags"] is not None:
        headers["X-Metergate-Tags"] = req["tags"]
    forwarded_before = len(fake.requests)
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.request(
            req["method"],
            aiohttp.client.URL(proxy.url + req["path"], encoded=True),
            data=req["body"],
            headers=headers,
        ) as r,
    ):
        body = await r.read()
        status = r.status
    forwarded = len(fake.requests) > forwarded_before
    # Every request that reached the upstream has its ledger record by now (the record
    # is committed before the response ends).
    assert len(await proxy.store.ledger_records()) >= len(fake.requests)
    if status >= 500:
        assert forwarded, (status, body[:300], req)  # only a relayed upstream error
        return
    if not forwarded and status >= 400:
        # The proxy's own refusal: an error body in one of the two providers' shapes.
        error = orjson.loads(body)
        assert isinstance(error, dict) and isinstance(error.get("error"), dict), body[:300]
        assert error["error"].get("message"), body[:300]
