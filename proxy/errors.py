"""Every refusal the proxy itself makes, rendered in the called provider's error shape.

The tree::

    MetergateError                      status  OpenAI type / Anthropic type
    ├── BadRequest                      400     invalid_request_error
    │   └── UnknownModelPrice           400     invalid_request_error (code unknown_model_price)
    ├── Unauthorized                    401     invalid_request_error / authentication_error
    ├── BudgetExceeded                  402     insufficient_quota / billing_error
    ├── NotFound                        404     invalid_request_error / not_found_error
    ├── PayloadTooLarge                 413     invalid_request_error / request_too_large
    ├── RateLimited                     429     rate_limit_exceeded / rate_limit_error
    ├── UpstreamUnavailable             502     api_error
    ├── StoreUnavailable                503     api_error / overloaded_error
    └── UpstreamTimeout                 504     api_error / timeout_error

Foreign exceptions (aiohttp, redis, json) are translated into this tree once, at the
boundary that catches them; nothing else in the code raises HTTP statuses.
"""

from __future__ import annotations

from typing import ClassVar

import orjson


class MetergateError(Exception):
    """A refusal by the proxy: knows its HTTP status and renders a provider-shaped body."""

    status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "api_error"
    anthropic_type: ClassVar[str] = "api_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.headers: dict[str, str] = dict(headers or {})

    def render(self, wire_format: str) -> bytes:
        """The JSON error body in the shape the given wire format's SDK parses."""
        if wire_format == "anthropic":
            return orjson.dumps(
                {"type": "error", "error": {"type": self.anthropic_type, "message": self.message}}
            )
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.openai_type,
                    "param": None,
                    "code": self.code,
                }
            }
        )


class BadRequest(MetergateError):
    """The request cannot be metered as sent: malformed JSON, no model, bad header."""

    status = 400
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    default_code = "invalid_request"


class UnknownModelPrice(BadRequest):
    """The model has no catalog price and the policy is ``reject``."""

    default_code = "unknown_model_price"


class Unauthorized(MetergateError):
    """No key, or a key the proxy does not know."""

    status = 401
    openai_type = "invalid_request_error"
    anthropic_type = "authentication_error"
    default_code = "invalid_api_key"


class BudgetExceeded(MetergateError):
    """A hard budget would be exceeded by this request."""

    status = 402
    openai_type = "insufficient_quota"
    anthropic_type = "billing_error"
    default_code = "budget_exceeded"


class NotFound(MetergateError):
    """No such upstream or route."""

    status = 404
    openai_type = "invalid_request_error"
    anthropic_type = "not_found_error"
    default_code = "not_found"


class PayloadTooLarge(MetergateError):
    """The request body is over the configured limit."""

    status = 413
    openai_type = "invalid_request_error"
    anthropic_type = "request_too_large"
    default_code = "request_too_large"


class RateLimited(MetergateError):
    """A requests- or tokens-per-minute limit is reached; carries ``Retry-After``."""

    status = 429
    openai_type = "requests"
    anthropic_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class UpstreamUnavailable(MetergateError):
    """The upstream could not be reached or broke the connection."""

    status = 502
    default_code = "upstream_unavailable"


class StoreUnavailable(MetergateError):
    """The budget store is unreachable and the policy is ``fail_closed``."""

    status = 503
    anthropic_type = "overloaded_error"
    default_code = "store_unavailable"


class UpstreamTimeout(MetergateError):
    """The upstream did not answer in time."""

    status = 504
    anthropic_type = "timeout_error"
    default_code = "upstream_timeout"
