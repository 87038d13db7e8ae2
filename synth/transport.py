"""One chat-completions call to the teacher, over one of two interchangeable transports.

- `AiohttpTransport` (default): one shared aiohttp session that speaks POST {base_url}/chat/completions itself.
  Measured on a 2-core box it costs ~0.3 ms CPU a call, against 1.9–3 ms for the openai SDK's layers
  (/work/shared/notes/teacher-client.md), which is what lets one core keep 256 requests in flight.
- `SdkTransport` (`--transport sdk`): `openai.AsyncOpenAI` on its aiohttp transport, its own retries off, for servers
  or set-ups that need exactly the SDK's behaviour.

Both return a `Reply` and raise only `KeyRefused`, `Retryable` or `Final`, so the engine's retry policy does not
depend on the transport. Neither puts the API key into an exception message.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import orjson

DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the SDK's default when OPENAI_BASE_URL is unset
TRANSPORTS = ("aiohttp", "sdk")


@dataclass(slots=True)
class Choice:
    index: int
    finish_reason: str | None
    content: str | None


@dataclass(slots=True)
class Reply:
    choices: list[Choice]
    prompt_tokens: int | None
    completion_tokens: int | None


class KeyRefused(Exception):
    """401/403, or a 429 saying the account's quota is spent: retrying cannot help and the run must stop."""

    def __init__(self, status: int, quota: bool = False):
        super().__init__(f"HTTP {status}" + (" insufficient_quota" if quota else ""))
        self.status = status
        self.quota = quota


class Retryable(Exception):
    """Worth another attempt: 429, 408/409/5xx, timeout, lost connection, malformed body, truncated answer."""

    def __init__(self, reason: str, retry_after: float | None = None, connection: bool = False,
                 throttled: bool = False, overloaded: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.connection = connection  # the teacher could not be reached at all (feeds "teacher unreachable")
        self.throttled = throttled    # a 429
        # the server pushed back (429, 5xx, 408, timeout, lost connection): bursts of these slow everyone down
        self.overloaded = overloaded or throttled or connection


class Final(Exception):
    """Another attempt would get the same answer (e.g. HTTP 400): the prompt is recorded as failed."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.status = status


class Transport(Protocol):
    async def complete(self, messages: list[dict], prompt_id: str) -> Reply: ...

    async def close(self) -> None: ...


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Retry-After as the SDK reads it: `retry-after-ms`, then `retry-after` in seconds or as an HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    v = headers.get("retry-after")
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def classify_status(status: int, headers: Mapping[str, str], message: str = "") -> Exception:
    """The exception for a non-200 answer, with the SDK's retry semantics (408, 409, 429 and 5xx retry)."""
    if status in (401, 403):
        return KeyRefused(status)
    if status == 429:
        if "insufficient_quota" in message:  # OpenAI's "You exceeded your current quota": no wait will help
            return KeyRefused(status, quota=True)
        return Retryable("HTTP 429 rate limited", retry_after_seconds(headers), throttled=True)
    if status >= 500 or status in (408, 409):
        return Retryable(f"HTTP {status}", retry_after_seconds(headers), overloaded=status != 409)
    return Final(f"HTTP {status}: {message[:200]}" if message else f"HTTP {status}", status)


def parse_reply(raw: bytes) -> Reply:
    """A chat.completion body → Reply; anything that is not one is Retryable (a proxy hiccup, a cut body)."""
    try:
        obj = orjson.loads(raw)  # ~5x faster than json.loads on a reply; invalid UTF-8 is a JSONDecodeError too
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise Retryable(f"malformed response ({type(e).__name__})") from None
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices:
        raise Retryable("response has no choices")
    out = []
    for i, ch in enumerate(choices):
        if not isinstance(ch, dict):
            raise Retryable("malformed response (choice is not an object)")
        msg = ch.get("message")
        content = msg.get("content") if isinstance(msg, dict) else None
        index = ch.get("index", i)
        out.append(Choice(index if isinstance(index, int) else i, ch.get("finish_reason"),
                          content if isinstance(content, str) else None))
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    return Reply(out, _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))


def _count(v: Any) -> int | None:
    """A token count, or None for anything a server put there that is not one."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _error_message(raw: bytes) -> str:
    """The error body's code/type and message, e.g. "insufficient_quota: You exceeded your current quota"."""
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(err, dict):
        return str(err or "")
    code = err.get("code") or err.get("type")
    msg = str(err.get("message", ""))
    return f"{code}: {msg}" if isinstance(code, str) and code else msg


def _sdk_style_headers(api_key: str) -> dict[str, str]:
    h = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json", "Accept": "application/json",
         "User-Agent": "distillery-synth"}
    # the SDK sends these when set; some gateways route or bill by them
    for env, name in (("OPENAI_ORG_ID", "OpenAI-Organization"), ("OPENAI_PROJECT_ID", "OpenAI-Project")):
        if os.environ.get(env):
            h[name] = os.environ[env]
    return h


class AiohttpTransport:
    """One aiohttp session with a connector sized to the concurrency; headers and URL built once."""

    def __init__(self, base_url: str | None, api_key: str, timeout: float, concurrency: int, model: str,
                 params: dict[str, Any]):
        import aiohttp
        import yarl  # aiohttp's URL type
        self._aiohttp = aiohttp
        self.url = (base_url or DEFAULT_BASE_URL).rstrip("/") + "/chat/completions"
        self.timeout = timeout
        self.model = model
        self.params = params
        # a few spare connections: a dropped one is replaced while its prompt waits to retry
        connector = aiohttp.TCPConnector(limit=concurrency + 8, limit_per_host=concurrency + 8,
                                         keepalive_timeout=30.0)
        # HTTPS_PROXY / NO_PROXY are honoured like httpx does, but looked up once here: aiohttp's trust_env does it
        # (and a ~/.netrc read) in a thread for every request, which cost more CPU than the request itself.
        try:
            proxy, proxy_auth = aiohttp.helpers.get_env_proxy_for_url(yarl.URL(self.url))
        except LookupError:
            proxy, proxy_auth = None, None
        self.session = aiohttp.ClientSession(
            connector=connector, headers=_sdk_style_headers(api_key), proxy=proxy, proxy_auth=proxy_auth,
            timeout=aiohttp.ClientTimeout(total=timeout))

    def encode(self, messages: list[dict]) -> bytes:
        return orjson.dumps({"model": self.model, "messages": messages, **self.params})  # compact UTF-8

    async def complete(self, messages: list[dict], prompt_id: str) -> Reply:
        aiohttp = self._aiohttp
        try:
            # X-Prompt-Id lets a server or proxy trace the retries of one prompt
            async with self.session.post(self.url, data=self.encode(messages),
                                         headers={"X-Prompt-Id": prompt_id}) as r:
                raw = await r.read()
                status, headers = r.status, r.headers
        except asyncio.TimeoutError:  # aiohttp's timeouts subclass it (check before ClientError)
            raise Retryable(f"timeout after {self.timeout:g} s", overloaded=True) from None
        except aiohttp.ClientConnectorError:
            raise Retryable("connection error (cannot connect)", connection=True) from None
        except (aiohttp.ClientError, ConnectionError):  # dropped connection, cut body
            raise Retryable("connection error", connection=True) from None
        if status != 200:
            raise classify_status(status, headers, _error_message(raw) if status < 500 else "")
        return parse_reply(raw)

    async def close(self) -> None:
        await self.session.close()


def _disconnected(exc: BaseException) -> bool:
    """True when an exception was caused by a closed connection rather than by waiting too long."""
    import aiohttp
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(exc, asyncio.TimeoutError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class SdkTransport:
    """openai.AsyncOpenAI on the SDK's aiohttp transport (pool sized to the concurrency), SDK retries off."""

    def __init__(self, base_url: str | None, api_key: str, timeout: float, concurrency: int, model: str,
                 params: dict[str, Any]):
        import httpx2  # openai 3.x is built on httpx2: its pool limits must be httpx2.Limits
        import openai
        self._openai = openai
        self.model = model
        self.params = params
        self.timeout = timeout
        limits = httpx2.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
        try:  # must be built inside the running event loop
            http = openai.DefaultAioHttpClient(limits=limits, timeout=timeout)
        except RuntimeError:  # the openai[aiohttp] extra is missing: the SDK's default httpx2 pool still works
            http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
        self.client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url or None, max_retries=0,
                                         timeout=timeout, http_client=http)

    async def complete(self, messages: list[dict], prompt_id: str) -> Reply:
        openai = self._openai
        try:
            resp = await self.client.chat.completions.create(model=self.model, messages=messages, **self.params,
                                                             extra_headers={"X-Prompt-Id": prompt_id})
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise KeyRefused(e.status_code) from None
        except openai.APITimeoutError as e:
            if _disconnected(e):  # the SDK's aiohttp transport reports a dropped connection as a connect timeout
                raise Retryable("connection error", connection=True) from None
            raise Retryable(f"timeout after {self.timeout:g} s", overloaded=True) from None
        except openai.APIConnectionError:
            raise Retryable("connection error", connection=True) from None
        except openai.APIStatusError as e:
            raise classify_status(e.status_code, e.response.headers,
                                  "" if e.status_code >= 500 else _error_message(e.response.content)) from None
        except ValueError as e:  # malformed body: json.JSONDecodeError / UnicodeDecodeError, not an APIError
            raise Retryable(f"malformed response ({type(e).__name__})") from None
        choices = [Choice(int(getattr(c, "index", i) or 0), c.finish_reason,
                          c.message.content if c.message else None) for i, c in enumerate(resp.choices or [])]
        if not choices:
            raise Retryable("response has no choices")
        u = resp.usage
        return Reply(choices, getattr(u, "prompt_tokens", None) if u else None,
                     getattr(u, "completion_tokens", None) if u else None)

    async def close(self) -> None:
        await self.client.close()


def make_transport(kind: str, base_url: str | None, api_key: str, timeout: float, concurrency: int, model: str,
                   params: dict[str, Any]) -> Transport:
    """Build inside the running event loop. `params`: temperature, top_p, max_tokens, n (only those set)."""
    if kind == "sdk":
        return SdkTransport(base_url, api_key, timeout, concurrency, model, params)
    if kind == "aiohttp":
        return AiohttpTransport(base_url, api_key, timeout, concurrency, model, params)
    raise ValueError(f"unknown transport {kind!r} (choose from {', '.join(TRANSPORTS)})")
