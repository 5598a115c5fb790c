"""Standard Webhooks signing and at-least-once delivery (service/jobs/webhooks.py), to real loopback
receivers. Signatures are checked with the `standardwebhooks` package (the spec's own Python library),
an implementation independent of ours, and against the spec's published test vector."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator

import pytest
from url_helpers import AcceptCounter, Reply, Seen, Server, no_outside_connections

from service.jobs.urls import UrlPolicy
from service.jobs.webhooks import (
    DEFAULT_EVENTS,
    EVENTS,
    deliver,
    new_message_id,
    new_secret,
    parse_secret,
    sign,
    verify,
)

standardwebhooks = pytest.importorskip("standardwebhooks")

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


@pytest.fixture(autouse=True)
def tripwire(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    with no_outside_connections(monkeypatch) as attempts:
        yield attempts
    assert attempts == [], f"a connection left loopback: {attempts}"


def policy_for(server: Server | AcceptCounter) -> UrlPolicy:
    return UrlPolicy(allow_http=True, allowlist=(f"127.0.0.1:{server.port}",), timeout_s=5)


def test_the_spec_test_vector() -> None:
    secret, msg_id, ts, body = (
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        (b'{"test": 2432232314}'),
    )
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign(secret, msg_id, ts, body) == expected
    assert verify(secret, msg_id, ts, body, f"v1,bm90IGl0 {expected}", now=ts + 10)
    assert not verify(secret, msg_id, ts, body + b" ", expected, now=ts)
    assert not verify(secret, msg_id, ts, body, expected, now=ts + 301)  # outside the replay window
    assert verify(secret, msg_id, ts, body, expected, tolerance_s=None)
    assert not verify(secret, msg_id, "soon", body, expected)


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must look like whsec_"),
        ("whsec_not*base64!", "not valid base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "at least 16"),
        ("whsec_", "at least 16"),
    ],
)
def test_a_malformed_secret_is_refused_clearly(secret: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_secret(secret)


def test_generated_secrets_and_ids() -> None:
    s = new_secret()
    assert len(parse_secret(s)) == 32 and new_message_id() != new_message_id()
    assert new_message_id().startswith("msg_")
    assert set(DEFAULT_EVENTS) < set(EVENTS) == {"completed", "failed", "progress"}


def test_delivered_once_after_two_failures_with_one_id_and_valid_signatures() -> None:
    def receiver(req: Seen, i: int) -> Reply:
        return Reply(500 if i < 2 else 204)

    states: list[dict[str, object]] = []
    payload = {"job_id": "j-1", "status": "succeeded", "result_url": "/v1/jobs/j-1/result", "ü": "✓"}
    with Server(receiver) as rx:
        state = asyncio.run(
            deliver(
                f"{rx.url}/hook",
                "msg_fixed1",
                "completed",
                payload,
                SECRET,
                policy_for(rx),
                30,
                on_attempt=states.append,
                backoff_base_s=0.01,
            )
        )
    assert state["delivered"] is True and state["attempts"] == 3
    assert state["last_status"] == 204 and state["last_error"] is None
    assert isinstance(state["delivered_at"], float) and state["id"] == "msg_fixed1"
    assert [s["attempts"] for s in states] == [1, 2, 3]
    assert [s["last_status"] for s in states] == [500, 500, 204]
    assert len(rx.seen) == 3
    assert {r.headers["webhook-id"] for r in rx.seen} == {"msg_fixed1"}
    assert len({r.body for r in rx.seen}) == 1  # the same message each time; only the signature's time moves
    wh = standardwebhooks.Webhook(SECRET)
    for r in rx.seen:
        assert r.method == "POST" and r.headers["content-type"] == "application/json"
        msg = wh.verify(r.body, r.headers)  # raises WebhookVerificationError when the signature is wrong
        assert msg["type"] == "job.completed" and msg["data"] == payload
        assert msg["timestamp"].endswith("Z")
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_secret()).verify(rx.seen[0].body, rx.seen[0].headers)


def test_a_delivery_that_never_succeeds_stops_after_max_s() -> None:
    with Server(Reply(500)) as rx:
        t0 = time.monotonic()
        state = asyncio.run(
            deliver(
                rx.url,
                "msg_x",
                "failed",
                {"job_id": "j"},
                SECRET,
                policy_for(rx),
                0.5,
                backoff_base_s=0.02,
                backoff_cap_s=0.1,
            )
        )
        elapsed = time.monotonic() - t0
    assert state["delivered"] is False and state["attempts"] >= 2 and state["attempts"] == len(rx.seen)
    assert state["last_status"] == 500 and state["last_error"] == "HTTP 500" and state["delivered_at"] is None
    assert elapsed < 10  # bounded (generous: no timing assert on a busy machine)


def test_back_off_doubles_with_full_jitter_up_to_the_cap_within_max_s() -> None:
    """A clock only the sleeps move: the schedule is exact whatever the machine's speed."""
    fake = [0.0]
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)
        fake[0] += s

    async def run() -> dict[str, object]:
        return await deliver(
            rx.url,
            "msg_y",
            "progress",
            {"done": 1},
            SECRET,
            policy_for(rx),
            1000,
            clock=lambda: fake[0],
            sleep=sleep,
            rand=lambda: 1.0,
        )

    with Server(Reply(503)) as rx:
        state = asyncio.run(run())
    assert sleeps == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]  # next 300 would pass 1000 s
    assert state["attempts"] == 11 == len(rx.seen) and state["delivered"] is False
    with Server(Reply(503)) as rx:
        sleeps.clear()
        fake[0] = 0.0
        asyncio.run(
            deliver(
                rx.url,
                "m",
                "progress",
                {},
                SECRET,
                policy_for(rx),
                10,
                clock=lambda: fake[0],
                sleep=sleep,
                rand=lambda: 0.25,
            )
        )
    assert sleeps == [0.25, 0.5, 1, 2, 4]  # full jitter: a fraction of the exponential step


def test_an_async_on_attempt_is_awaited() -> None:
    seen: list[int] = []

    async def record(state: dict[str, object]) -> None:
        await asyncio.sleep(0)
        seen.append(int(state["attempts"]))  # type: ignore[call-overload]

    with Server(Reply(200)) as rx:
        state = asyncio.run(
            deliver(rx.url, "m", "completed", {}, SECRET, policy_for(rx), 5, on_attempt=record)
        )
    assert seen == [1] and state["delivered"] is True


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{p}/",
        "http://169.254.169.254/hook",
        "http://[::ffff:10.0.0.1]/",
        "https://10.1.1.1/",
    ],
)
def test_a_refused_webhook_url_is_final_and_never_connects(url: str) -> None:
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    with AcceptCounter() as c:
        state = asyncio.run(
            deliver(
                url.format(p=c.port), "m", "failed", {}, SECRET, UrlPolicy(allow_http=True), 3600, sleep=sleep
            )
        )
        time.sleep(0.05)
        assert c.accepts == 0
    assert state["delivered"] is False and state["attempts"] == 1 and sleeps == []
    assert "not allowed" in str(state["last_error"]) and state["last_status"] is None


def test_http_webhooks_need_the_setting_and_unknown_events_are_refused() -> None:
    with Server(Reply(200)) as rx:
        strict = UrlPolicy(allowlist=(f"127.0.0.1:{rx.port}",))
        state = asyncio.run(deliver(rx.url, "m", "completed", {}, SECRET, strict, 5))
        assert state["attempts"] == 1 and "only https" in str(state["last_error"]) and rx.seen == []
        with pytest.raises(ValueError, match="webhook event"):
            asyncio.run(deliver(rx.url, "m", "job.done", {}, SECRET, policy_for(rx), 5))
        with pytest.raises(ValueError, match="whsec_"):
            asyncio.run(deliver(rx.url, "m", "completed", {}, "hunter2", policy_for(rx), 5))


def test_a_receiver_that_does_not_answer_in_time_is_retried() -> None:
    def receiver(req: Seen, i: int) -> Reply:
        return Reply(200, delay_s=30) if i == 0 else Reply(200)

    with Server(receiver) as rx:
        policy = UrlPolicy(allow_http=True, allowlist=(f"127.0.0.1:{rx.port}",), timeout_s=0.3)
        state = asyncio.run(
            deliver(rx.url, "m", "completed", {"a": 1}, SECRET, policy, 60, backoff_base_s=0.01)
        )
    assert state["delivered"] is True and state["attempts"] == 2
    assert json.loads(rx.seen[1].body)["data"] == {"a": 1}
