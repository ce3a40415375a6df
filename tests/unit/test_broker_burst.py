"""The burst window: when the second consumer is wanted (pure; the clock is passed in), and what
it does with a delivery that reaches it after the window closed."""

from __future__ import annotations

import pytest

from deployflag.broker.burst import BurstConsumer, BurstPolicy
from deployflag.metrics import Metrics

SHORT = 0.25
LARGE = 64 * 1024
STREAK = 4


@pytest.fixture
def policy() -> BurstPolicy:
    return BurstPolicy(short_seconds=SHORT, large_bytes=LARGE, streak_needed=STREAK)


def run_short(policy: BurstPolicy, count: int, start: int = 0, at: float = 0.0) -> float:
    """``count`` small requests one after another, each 10 ms; returns the time after them."""
    for token in range(start, start + count):
        policy.started(token, 1500, at)
        at += 0.01
        policy.finished(token, at)
    return at


def test_closed_at_start(policy: BurstPolicy) -> None:
    assert policy.wanted is False


def test_opens_after_a_whole_streak_of_short_requests(policy: BurstPolicy) -> None:
    run_short(policy, STREAK - 1)
    assert policy.wanted is False
    run_short(policy, 1, start=STREAK - 1, at=1.0)
    assert policy.wanted is True


def test_a_request_over_the_short_time_closes_it_when_it_finishes(policy: BurstPolicy) -> None:
    at = run_short(policy, STREAK)
    policy.started(100, 1500, at)
    policy.finished(100, at + SHORT + 0.01)
    assert policy.wanted is False


def test_a_request_still_running_past_the_short_time_closes_it(policy: BurstPolicy) -> None:
    at = run_short(policy, STREAK)
    policy.started(100, 1500, at)
    policy.check(at + SHORT / 2)
    assert policy.wanted is True
    policy.check(at + SHORT + 0.01)
    assert policy.wanted is False


def test_a_large_body_closes_it_as_soon_as_it_arrives(policy: BurstPolicy) -> None:
    at = run_short(policy, STREAK)
    policy.started(100, LARGE + 1, at)
    assert policy.wanted is False
    # A body of exactly the limit is still small.
    at = run_short(policy, STREAK, start=200, at=at)
    policy.started(300, LARGE, at)
    assert policy.wanted is True


def test_after_closing_it_needs_a_whole_new_streak(policy: BurstPolicy) -> None:
    at = run_short(policy, STREAK)
    policy.started(100, LARGE + 1, at)
    policy.finished(100, at + 5.0)
    at = run_short(policy, STREAK - 1, start=200, at=at + 5.0)
    assert policy.wanted is False
    run_short(policy, 1, start=300, at=at)
    assert policy.wanted is True


def test_a_streak_does_not_open_it_while_a_long_request_is_still_running(
    policy: BurstPolicy,
) -> None:
    policy.started(100, 1500, 0.0)  # starts, and runs on
    at = run_short(policy, STREAK, start=1, at=SHORT + 0.1)
    assert policy.wanted is False
    policy.finished(100, at)  # long: the streak starts again
    run_short(policy, STREAK, start=200, at=at)
    assert policy.wanted is True


def test_stopped_it_never_opens_again(policy: BurstPolicy) -> None:
    run_short(policy, STREAK)
    policy.stop()
    assert policy.wanted is False
    run_short(policy, 3 * STREAK, start=100, at=10.0)
    assert policy.wanted is False


def test_an_unknown_token_is_ignored(policy: BurstPolicy) -> None:
    policy.finished(12345, 1.0)
    assert policy.wanted is False


class FakeMessage:
    """What ``BurstConsumer._deliver`` touches of an incoming message."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.nacked: list[bool] = []

    async def nack(self, requeue: bool = True) -> None:
        self.nacked.append(requeue)


def consumer(policy: BurstPolicy, dispatched: list[object]) -> tuple[BurstConsumer, Metrics]:
    async def dispatch(message: object) -> None:
        dispatched.append(message)

    metrics = Metrics(process_metrics=False)
    burst = BurstConsumer(
        None,  # type: ignore[arg-type]  # never used: nothing here subscribes
        "training",
        prefetch=6,
        base_prefetch=2,
        policy=policy,
        dispatch=dispatch,  # type: ignore[arg-type]
        metrics=metrics,
    )
    return burst, metrics


async def test_a_delivery_after_the_window_closed_is_handed_back_untouched(
    policy: BurstPolicy,
) -> None:
    dispatched: list[object] = []
    burst, metrics = consumer(policy, dispatched)
    message = FakeMessage()
    await burst._deliver(message)  # type: ignore[arg-type]
    assert dispatched == []
    assert message.nacked == [True]
    assert metrics.registry.get_sample_value("deployflag_burst_handed_back_total") == 1.0


async def test_a_delivery_while_the_window_is_open_is_handled(policy: BurstPolicy) -> None:
    dispatched: list[object] = []
    burst, metrics = consumer(policy, dispatched)
    run_short(policy, STREAK)
    message = FakeMessage()
    await burst._deliver(message)  # type: ignore[arg-type]
    assert dispatched == [message]
    assert message.nacked == []
    assert metrics.registry.get_sample_value("deployflag_burst_handed_back_total") == 0.0
