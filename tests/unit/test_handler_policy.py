"""The acknowledgement policy, one test per row of the table in docs/handler.md.

The handler runs in this process against fakes (tests/unit/handler_fakes.py): no broker, no
database, no subprocess. The pool runs the real worker functions here unless a test scripts a
crash, a time limit or a rejection.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from aio_pika.exceptions import AMQPConnectionError

from deployflag.broker import tolerant
from deployflag.broker.publisher import Unroutable
from deployflag.errors import FatalError, InvalidRequest, TransientError
from deployflag.exitcodes import RET_CONFIG
from deployflag.messages import Reply, encode_reply
from deployflag.pool import JobTimeLimit, WorkerCrashed
from tests.unit.handler_fakes import FakeMessage, rig

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
TASK = "deployflag.contrib.ocave.tasks.process_data_from_ocave"


def request(request_id: str = "r1", **fields: object) -> FakeMessage:
    return FakeMessage(WORKED, message_id=request_id, **fields)  # type: ignore[arg-type]


# --- ack ---------------------------------------------------------------------------------------


async def test_a_trained_request_is_recorded_answered_then_acked() -> None:
    r = rig()
    message = await r.deliver(request("r1"))
    assert message.settled == ["ack"]
    assert r.store.records == ["r1"]
    [reply] = r.publisher.replies
    assert reply.correlation_id == "r1"
    assert (
        orjson.loads(reply.body)["scores"][0]["issue_weight"] == 95
    )  # the worked example under forecast scoring
    assert r.count("ok") == 1


async def test_a_request_the_claim_finds_done_gets_the_stored_result_and_is_not_recorded() -> None:
    r = rig()
    await r.deliver(request("r1"))
    again = await r.deliver(request("r1", redelivered=True))
    assert again.settled == ["ack"]
    assert r.store.records == ["r1"], "recorded once"
    assert "process" not in r.pool.calls[1:], "a redelivered copy claims first: nothing trained"
    assert r.publisher.replies[1].body == r.publisher.replies[0].body
    assert r.count("duplicate") == 1
    assert r.timed("pipeline") == 1, "the duplicate's thrown-away job is not timed as a run"


async def test_a_record_that_finds_a_concurrent_winner_publishes_the_winners_result() -> None:
    r = rig()

    def concurrent_copy_recorded_first() -> None:
        r.store.results["r1"] = {**_result_of(WORKED, "r1"), "deployflag_version": "winner"}

    r.store.record_script.append(concurrent_copy_recorded_first)
    message = await r.deliver(request("r1"))
    assert message.settled == ["ack"]
    assert orjson.loads(r.publisher.replies[0].body)["deployflag_version"] == "winner"
    assert r.count("duplicate") == 1
    assert r.count("ok") == 0, "the stored row, not this copy's computation, is the answer"


def _result_of(body: bytes, request_id: str) -> dict[str, object]:
    from datetime import UTC, datetime

    from deployflag import pipeline
    from deployflag.settings import load_settings

    computation = pipeline.run(body, load_settings().pipeline_config())
    return {
        **computation.model_dump(mode="json"),
        "request_id": request_id,
        "status": "ok",
        "deployflag_version": "stored",
        "finished_at": datetime.now(UTC).isoformat(),
    }


async def test_a_second_copy_waits_for_the_first_and_answers_from_the_store() -> None:
    r = rig()
    release = asyncio.Event()
    first_running = asyncio.Event()

    async def slow_job(*args: object) -> object:
        from deployflag import worker

        first_running.set()
        await release.wait()
        return worker.process(*args)  # type: ignore[arg-type]

    r.pool.script.append(slow_job)
    first = asyncio.create_task(r.deliver(request("r1")))
    await first_running.wait()
    second = asyncio.create_task(r.deliver(request("r1")))
    await asyncio.sleep(0)  # the second copy reaches its wait
    # The first copy's claim may wait for its job (folded with the record); the second's waits.
    assert r.store.claims in ([], ["r1"]), "the second copy does not claim while the first trains"
    release.set()
    await asyncio.gather(first, second)
    assert first.result().settled == second.result().settled == ["ack"]
    assert r.pool.calls.count("process") == 1, "trained once"
    assert r.store.attempts["r1"] == 1
    assert len(r.publisher.replies) == 2
    assert r.publisher.replies[0].body == r.publisher.replies[1].body
    assert r.count("duplicate") == 1


async def test_a_speculative_job_is_discarded_when_the_claim_says_done() -> None:
    r = rig()
    r.store.results["r1"] = _result_of(WORKED, "r1")
    message = await r.deliver(request("r1"))  # small, first delivery: the job starts at once
    assert r.pool.calls == ["process"], "the speculative job ran"
    assert r.store.records == [], "and its result was thrown away"
    assert message.settled == ["ack"]
    assert orjson.loads(r.publisher.replies[0].body)["deployflag_version"] == "stored"
    assert r.count("duplicate") == 1


# --- park --------------------------------------------------------------------------------------


async def test_a_small_first_delivery_is_claimed_and_recorded_in_one_write_after_its_job() -> None:
    r = rig()
    message = await r.deliver(request("r1"))
    assert message.settled == ["ack"]
    assert r.pool.calls == ["process"]
    assert r.store.folds == ["r1"], "one write"
    assert r.store.claims == ["r1"], "the attempt is still counted"
    assert r.store.attempts["r1"] == 1
    assert r.store.records == ["r1"]
    assert r.count("ok") == 1
    assert (r.timed("pipeline"), r.timed("record"), r.timed("claim")) == (1, 1, 0)


async def test_a_folded_claim_that_finds_the_request_done_answers_with_the_stored_result() -> None:
    r = rig()
    await r.deliver(request("r1"))
    again = await r.deliver(request("r1"))  # published twice, not redelivered: speculates
    assert again.settled == ["ack"]
    assert r.store.folds == ["r1", "r1"]
    assert r.store.records == ["r1"], "recorded once"
    assert r.publisher.replies[1].body == r.publisher.replies[0].body
    assert r.count("duplicate") == 1
    assert r.timed("pipeline") == 1, "the duplicate's thrown-away job is not timed as a run"


async def test_a_folded_claim_out_of_attempts_parks_max_attempts_without_a_result() -> None:
    r = rig()
    r.store.attempts["r1"] = 3  # earlier copies, elsewhere, used every attempt
    message = await r.deliver(request("r1"))
    assert message.settled == ["ack"]
    assert r.store.attempts["r1"] == 4, "counted"
    assert r.store.records == []
    assert r.store.failures == [("r1", "max_attempts")]
    assert r.publisher.parked == [("r1", "max_attempts")]


async def test_a_redelivered_copy_claims_first_and_never_folds() -> None:
    r = rig()
    message = await r.deliver(request("r1", redelivered=True))
    assert message.settled == ["ack"]
    assert r.store.folds == []
    assert (r.store.claims, r.store.records) == (["r1"], ["r1"])


async def test_a_speculative_job_that_crashes_is_claimed_afterwards_and_counted() -> None:
    r = rig()
    r.pool.script.append(WorkerCrashed("killed"))
    message = await r.deliver(request("r1"))
    assert message.settled == ["ack"]
    assert r.store.folds == []
    assert r.store.attempts["r1"] == 2, "the claim after the crash and the retry's claim"
    assert r.store.records == ["r1"]


async def test_a_body_over_the_size_limit_is_parked_too_large_without_being_parsed() -> None:
    r = rig(max_message_bytes=100)
    message = await r.deliver(request("big"))
    assert message.settled == ["ack"]
    assert r.publisher.parked == [("big", "too_large")]
    assert r.store.failures == [("big", "too_large")]
    assert r.pool.calls == []
    assert r.store.claims == []
    assert r.count("parked", "too_large") == 1


async def test_an_invalid_body_is_parked_with_its_reason() -> None:
    r = rig()
    message = await r.deliver(FakeMessage(b"{nope", message_id="bad"))
    assert message.settled == ["ack"]
    assert r.publisher.parked == [("bad", "not_json")]
    assert r.store.claims == [], "nothing claimed for a message that is no request"
    assert r.count("parked", "not_json") == 1


async def test_an_unknown_celery_task_is_parked_unknown_task() -> None:
    r = rig()
    message = FakeMessage(b"[[{}], {}, {}]", headers={"task": "evil.task", "id": "t1"})
    await r.deliver(message)
    assert message.settled == ["ack"]
    assert r.publisher.parked == [("t1", "unknown_task")]


@pytest.mark.parametrize("reason", ["pipeline_rejected", "memory_limit"])
async def test_a_request_the_worker_rejects_is_parked_at_once(reason: str) -> None:
    r = rig()
    r.pool.script.append(InvalidRequest(reason, "the worker said no"))
    message = await r.deliver(request("r1"))
    assert message.settled == ["ack"]
    assert r.publisher.parked == [("r1", reason)]
    assert r.store.failures == [("r1", reason)]
    assert r.pool.calls == ["process"], "not retried"
    assert r.count("parked", reason) == 1


async def test_a_request_out_of_attempts_is_parked_max_attempts_without_a_result() -> None:
    r = rig(max_attempts=3)
    r.store.attempts["r1"] = 3  # three earlier deliveries crashed their workers
    message = await r.deliver(request("r1"))
    assert message.settled == ["ack"]
    assert r.publisher.parked == [("r1", "max_attempts")]
    assert r.store.records == []
    assert r.publisher.replies == []


async def test_a_request_that_crashes_its_worker_every_time_is_parked_after_max_attempts() -> None:
    r = rig(max_attempts=3)
    r.pool.script.extend(WorkerCrashed("killed") for _ in range(3))
    message = await r.deliver(request("r1"))
    assert message.settled == ["ack"]
    assert r.pool.calls == ["process"] * 3
    assert r.store.attempts["r1"] == 4, "each crash counted; the fourth claim is over the limit"
    assert r.publisher.parked == [("r1", "worker_crashed")]
    assert r.count("parked", "worker_crashed") == 1


async def test_a_request_past_its_time_limit_every_time_is_parked_time_limit() -> None:
    r = rig(max_attempts=2)
    r.pool.script.extend(JobTimeLimit("ran past") for _ in range(2))
    message = await r.deliver(request("r1"))
    assert message.settled == ["ack"]
    assert r.pool.calls == ["process"] * 2
    assert r.publisher.parked == [("r1", "time_limit")]


async def test_a_crash_then_success_answers_with_one_attempt_counted_per_crash() -> None:
    r = rig(max_attempts=3)
    r.pool.script.append(WorkerCrashed("killed"))
    message = await r.deliver(request("r1"))
    assert message.settled == ["ack"]
    assert r.store.attempts["r1"] == 2
    assert r.count("ok") == 1


async def test_an_unroutable_reply_is_parked_reply_unroutable() -> None:
    r = rig()
    r.publisher.reply_script.append(Unroutable("'nowhere': NO_ROUTE"))
    message = await r.deliver(request("r1", reply_to="nowhere"))
    assert message.settled == ["ack"]
    assert r.publisher.parked == [("r1", "reply_unroutable")]
    assert r.store.records == ["r1"], "the result stays recorded"


async def test_a_reply_over_the_size_limit_is_parked_before_the_result_is_recorded() -> None:
    r = rig(max_message_bytes=len(WORKED))

    def many_scores(*args: object) -> object:
        from deployflag import worker

        computed = worker.process(*args)  # type: ignore[arg-type]
        scores = computed.computation.scores * 100  # a reply far larger than its request
        computation = computed.computation.model_copy(update={"scores": scores})
        return worker.Computed(computation, computed.seconds, computed.pid)

    r.pool.script.append(many_scores)
    message = await r.deliver(request("r1"))
    assert message.settled == ["ack"]
    assert r.publisher.parked == [("r1", "reply_too_large")]
    assert r.publisher.replies == []
    assert r.store.records == [], "not recorded as done: a redelivery must not be answered"
    assert r.store.failures == [("r1", "reply_too_large")]


async def test_the_reply_is_encoded_once_and_those_bytes_are_published(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from deployflag import handler

    encoded: list[bytes] = []

    def counting(*args: Any, **kwargs: Any) -> Reply:
        reply = encode_reply(*args, **kwargs)
        encoded.append(reply.body)
        return reply

    monkeypatch.setattr(handler, "encode_reply", counting)
    r = rig()
    await r.deliver(request("r1"))
    assert len(encoded) == 1, "size checked before the record, published after: one encoding"
    assert r.publisher.replies[0].body is encoded[0]


async def test_a_message_with_an_undecodable_property_is_parked_before_it_is_read() -> None:
    r = rig()
    cause = "message_id: UnicodeDecodeError (raw b'\\xff')"
    message = request("u1", headers={tolerant.UNDECODABLE: cause})
    await r.deliver(message)
    assert message.settled == ["ack"]
    [(_, reason)] = r.publisher.parked
    assert reason == "undecodable_properties"
    assert r.store.claims == [], "not claimed: its envelope is incomplete"
    assert r.pool.calls == []


async def test_a_value_the_database_refuses_is_parked_bad_data_even_when_unrecordable() -> None:
    r = rig()
    refused = InvalidRequest("bad_data", "the database refused a value: 22021")
    r.store.claim_script.append(refused)
    r.store.failure_script.append(refused)  # the same value in the failure row
    message = await r.deliver(request("r1"))
    assert message.settled == ["ack"], "parked at the first delivery, not requeued"
    assert r.publisher.parked == [("r1", "bad_data")]
    assert r.store.failures == []
    assert r.count("parked", "bad_data") == 1


async def test_a_known_id_with_another_body_is_parked_id_conflict_leaving_the_row_alone() -> None:
    r = rig()
    await r.deliver(request("R"))
    other = orjson.dumps({**orjson.loads(WORKED), "repo_id": 99})
    message = await r.deliver(FakeMessage(other, message_id="R"))
    assert message.settled == ["ack"]
    assert r.publisher.parked == [("R", "id_conflict")]
    assert r.store.failures == [], "the row is the first body's: not marked failed"
    assert len(r.publisher.replies) == 1, "never answered with the other body's result"
    assert r.store.records == ["R"]


# --- transient trouble ---------------------------------------------------------------------------


async def test_transient_database_trouble_is_retried_in_place_then_succeeds() -> None:
    r = rig()
    r.store.claim_script.extend([TransientError("down"), TransientError("still down")])
    seen_down: list[bool] = []

    def still_unready() -> None:
        seen_down.append(r.health.database_ok)

    r.store.claim_script.append(still_unready)
    message = await r.deliver(request("r1", redelivered=True))  # claims first
    assert message.settled == ["ack"]
    assert seen_down == [False], "readiness said the database was down while it was"
    assert r.health.database_ok, "and up again after the call succeeded"
    assert r.count("retried", "claim") == 2
    assert r.count("ok") == 1


async def test_transient_trouble_in_a_folded_claim_and_record_is_retried_then_succeeds() -> None:
    r = rig()
    r.store.claim_script.extend([TransientError("down"), TransientError("still down")])
    message = await r.deliver(request("r1"))  # a first delivery: claim and record in one write
    assert message.settled == ["ack"]
    assert r.store.folds == ["r1", "r1", "r1"]
    assert r.store.attempts["r1"] == 1, "the failed tries counted nothing"
    assert r.count("retried", "record") == 2
    assert r.health.database_ok
    assert r.count("ok") == 1


async def test_transient_broker_trouble_on_the_reply_is_retried_then_succeeds() -> None:
    r = rig()
    r.publisher.reply_script.extend([AMQPConnectionError("gone"), ConnectionError("reset")])
    message = await r.deliver(request("r1"))
    assert message.settled == ["ack"]
    assert len(r.publisher.replies) == 1
    assert r.count("retried", "publish") == 2
    assert r.health.database_ok, "broker trouble says nothing about the database"


async def test_a_failed_ack_hands_the_delivery_back() -> None:
    r = rig()
    message = request("r1", ack_error=ConnectionError("connection reset"))
    await r.deliver(message)
    assert message.settled == ["nack:requeue"]
    assert r.store.records == ["r1"], "the redelivered copy will find the result recorded"


async def test_a_channel_closed_during_a_retry_abandons_the_delivery_without_a_nack() -> None:
    r = rig()
    message = request("r1")

    def channel_closes() -> None:
        message.channel.is_closed = True
        raise TransientError("down")

    r.store.claim_script.append(channel_closes)
    await r.deliver(message)
    assert message.settled == [], "a closed channel hands its deliveries back by itself"
    assert r.publisher.parked == []
    assert r.publisher.replies == []


async def test_stopping_during_a_retry_requeues_the_delivery() -> None:
    r = rig()
    message = request("r1")

    def stop_now() -> None:
        r.stopping.set()
        raise TransientError("down")

    r.store.claim_script.append(stop_now)
    await r.deliver(message)
    assert message.settled == ["nack:requeue"]


async def test_cancellation_requeues_the_delivery_shielded_and_propagates() -> None:
    r = rig()
    started = asyncio.Event()

    async def forever(*args: object) -> object:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    r.pool.script.append(forever)
    message = request("r1", redelivered=True)
    task = asyncio.create_task(r.deliver(message))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert message.settled == ["nack:requeue"]


async def test_a_delivery_after_the_service_decided_to_stop_is_left_for_the_broker() -> None:
    r = rig()
    r.stopping.set()
    message = await r.deliver(request("r1"))
    assert message.settled == []
    assert r.store.claims == []
    assert r.pool.calls == []


# --- fatal and unexpected errors -----------------------------------------------------------------


@pytest.mark.parametrize("stage", ["claim", "record"])
async def test_a_fatal_error_keeps_the_delivery_and_stops_the_service(stage: str) -> None:
    r = rig()
    error = FatalError("database refused us: password authentication failed", RET_CONFIG)
    (r.store.claim_script if stage == "claim" else r.store.record_script).append(error)
    message = await r.deliver(request("r1"))
    assert message.settled == [], "not acked, not parked: the broker requeues it at close"
    assert r.publisher.parked == []
    assert r.store.failures == []
    assert r.fatal == [error]
    assert r.stopping.is_set()
    assert r.pool.calls.count("process") <= 1, "trained at most once"


async def test_the_third_unexpected_failure_of_a_message_parks_it_internal_error() -> None:
    r = rig()
    for _ in range(3):
        r.store.claim_script.append(RuntimeError("a bug"))
    settled = [(await r.deliver(request("r1", redelivered=n > 0))).settled for n in range(3)]
    assert settled == [["nack:requeue"], ["nack:requeue"], ["ack"]]
    assert r.publisher.parked == [("r1", "internal_error")]
    assert r.store.failures == [("r1", "internal_error")]
    assert r.count("parked", "internal_error") == 1


async def test_an_internal_error_park_that_cannot_be_recorded_parks_without_the_row() -> None:
    r = rig()
    for _ in range(3):
        r.store.claim_script.append(RuntimeError("a bug"))
    r.store.failure_script.append(RuntimeError("the record fails too"))
    for n in range(3):
        message = await r.deliver(request("r1", redelivered=n > 0))
    assert message.settled == ["ack"]
    assert r.publisher.parked == [("r1", "internal_error")]
    assert r.store.failures == []


async def test_an_unexpected_error_requeues_the_delivery_and_keeps_serving() -> None:
    r = rig()
    r.store.claim_script.append(RuntimeError("a bug"))
    message = await r.deliver(request("r1"))
    assert message.settled == ["nack:requeue"]
    assert not r.stopping.is_set()
    again = await r.deliver(request("r2"))
    assert again.settled == ["ack"]


# --- large bodies: the pool round trips ----------------------------------------------------------


def large(body: bytes = WORKED) -> bytes:
    """The same request, padded past the inline-decode size with a field the schema ignores."""
    from deployflag.handler import INLINE_DECODE_BYTES

    request = orjson.loads(body)
    request["padding"] = "x" * INLINE_DECODE_BYTES
    return orjson.dumps(request)


async def test_a_large_plain_json_request_takes_one_pool_round_trip() -> None:
    r = rig()
    message = await r.deliver(FakeMessage(large(), message_id="big-json"))
    assert message.settled == ["ack"]
    assert r.pool.calls == ["process"], "no separate trip to learn the envelope"
    assert r.store.claims == ["big-json"], "claimed before it was computed"
    assert r.publisher.replies[0].correlation_id == "big-json"


async def test_a_large_invalid_body_presumed_json_is_parked_with_its_own_reason() -> None:
    r = rig()
    body = b'{"repo_id": 1, "padding": "' + b"x" * 70_000 + b'"'  # truncated JSON
    message = await r.deliver(FakeMessage(body, message_id="big-broken"))
    assert message.settled == ["ack"]
    assert r.publisher.parked == [("big-broken", "not_json")]


async def test_a_large_celery_protocol_1_body_is_answered_under_its_own_task_id() -> None:
    r = rig()
    body = orjson.dumps({"task": TASK, "id": "task-7", "args": [orjson.loads(large())]})
    message = await r.deliver(FakeMessage(body, message_id="amqp-id"))
    assert message.settled == ["ack"]
    assert r.publisher.replies[0].correlation_id == "task-7"
    assert "task-7" in r.store.results
