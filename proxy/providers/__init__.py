"""Wire-format translators: pure functions of bytes, no I/O."""

from __future__ import annotations

from proxy.providers.anthropic import AnthropicProvider
from proxy.providers.base import ParsedRequest, Provider, StreamMeter
from proxy.providers.openai import OpenAIProvider

PROVIDERS: dict[str, Provider] = {"openai": OpenAIProvider(), "anthropic": AnthropicProvider()}

__all__ = [
    "PROVIDERS",
    "AnthropicProvider",
    "OpenAIProvider",
    "ParsedRequest",
    "Provider",
    "StreamMeter",
]
