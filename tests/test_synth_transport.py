"""Both teacher transports (lean aiohttp, openai SDK) against the real loopback teacher: same request on the wire,
same reading of every fault, so the engine's retry policy holds whichever one a run uses."""
from __future__ import annotations

import asyncio
import email.utils
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loopback_teacher import LoopbackTeacher  # noqa: E402

from synth.transport import Final, KeyRefused, Retryable, make_transport, retry_after_seconds  # noqa: E402

TRANSPORTS = ["aiohttp", "sdk"]
MESSAGES = [{"role": "user", "content": "祝赵老师元宵节快乐，严肃风格"}]
PARAMS = {"temperature": 0.7, "max_tokens": 128, "n": 2}


def call(kind: str, base_url: str, *, key: str = "sk-transport-test", timeout: float = 5.0,
         params: dict | None = None):
    """One complete() on a fresh transport; returns the Reply or the exception it raised."""
    async def go():
        t = make_transport(kind, base_url, key, timeout, 4, "loopback-model", PARAMS if params is None else params)
        try:
            return await t.complete(MESSAGES, "p-0123-0")
        except Exception as e:  # noqa: BLE001 - the test inspects what was raised
            return e
        finally:
            await t.close()
    return asyncio.run(go())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_request_on_the_wire_and_reply(kind):
    with LoopbackTeacher() as t:
        r = call(kind, t.base_url)
        req = t.last_request
    assert not isinstance(r, Exception), r
    assert req["body"] == {"model": "loopback-model", "messages": MESSAGES, **PARAMS}
    assert req["headers"]["authorization"] == "Bearer sk-transport-test"
    assert req["headers"]["x-prompt-id"] == "p-0123-0"
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason == "stop" and c.content.strip().startswith("祝您") for c in r.choices)
    assert r.prompt_tokens == len(MESSAGES[0]["content"]) and r.completion_tokens == 40


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("fault, reason, connection, throttled", [
    ("429", "HTTP 429", False, True),
    ("500", "HTTP 500", False, False),
    ("503", "HTTP 503", False, False),
    ("drop", "connection error", True, False),
    ("malformed", "malformed response", False, False),
    ("slow", "timeout after 0.3 s", False, False),
    ("truncate", "connection error", True, False),
    ("reset", "connection error", True, False),
    ("html", "HTTP 502", False, False),
])
def test_faults_are_read_the_same_way(kind, fault, reason, connection, throttled):
    with LoopbackTeacher(faults={fault: 1.0}, retry_after=0.25, slow_s=2.0) as t:
        r = call(kind, t.base_url, timeout=0.3)
    assert isinstance(r, Retryable), r
    assert r.reason.startswith(reason)
    assert r.connection is connection and r.throttled is throttled
    if fault == "429":
        assert r.retry_after == pytest.approx(0.25)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_length_is_returned_for_the_engine_to_judge(kind):
    with LoopbackTeacher(faults={"length": 1.0}) as t:
        r = call(kind, t.base_url, params={})
    assert [c.finish_reason for c in r.choices] == ["length"]


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_400_is_final_and_401_refuses_without_echoing_the_key(kind):
    with LoopbackTeacher(faults={"400": 1.0}) as t:
        r = call(kind, t.base_url)
    assert isinstance(r, Final) and str(r).startswith("HTTP 400") and "top_p" in str(r)
    with LoopbackTeacher(api_key="the-right-key", echo_key_on_401=True) as t:
        r = call(kind, t.base_url, key="sk-wrong-SECRET")
    assert isinstance(r, KeyRefused) and r.status == 401
    assert "sk-wrong-SECRET" not in str(r)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_nothing_listening_is_a_connection_error(kind):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = call(kind, f"http://127.0.0.1:{port}/v1")
    assert isinstance(r, Retryable) and r.connection


def test_retry_after_forms():
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after_seconds({"retry-after": date}) <= 31
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


def test_odd_bodies_are_retryable_or_tolerated():
    from synth.transport import parse_reply
    for raw in (b'{"id": "x", "choices": [{"mess', b"[1, 2]", b'{"choices": []}', b'{"choices": ["x"]}',
                b"\xff\xfe"):
        with pytest.raises(Retryable):
            parse_reply(raw)
    r = parse_reply(b'{"choices": [{"index": "zero", "finish_reason": "stop", "message": {"content": 7}}],'
                    b' "usage": {"prompt_tokens": "12", "completion_tokens": 5}}')
    assert (r.choices[0].index, r.choices[0].content) == (0, None)  # the engine then rejects the empty text
    assert (r.prompt_tokens, r.completion_tokens) == (None, 5)
