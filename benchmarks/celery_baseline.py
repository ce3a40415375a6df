"""The Celery side of the service benchmark: deployflag's own pipeline, store and reply, run by a
stock Celery prefork worker the way the original service ran (``celery -A celery_baseline worker``).

Per task, the same work as ``deployflag serve`` does per message: claim the request id, compute
(``deployflag.pipeline``), record the result and its metadata with deployflag's ``Store`` into
SQLite, publish the same JSON reply (``correlation_id`` = task id) with publisher confirms, and
only then ack (``acks_late``). Each worker process keeps one event loop and one ``Store`` for its
life, opened in ``worker_process_init``; with ``max_tasks_per_child=1`` that life is one task,
exactly the cost the original paid.

Configured from the environment: BENCH_AMQP_URL, BENCH_EXCHANGE, BENCH_TRAINING_QUEUE,
BENCH_RESULT_QUEUE, BENCH_DATABASE_URL. The command line chooses the pool and its limits.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown
from kombu import Exchange, Queue

# Imported in the parent, before the pool forks, as the original imported its libraries
# (deployflag.pipeline itself imports numpy and scikit-learn only when it first computes).
import deployflag.pipeline.model  # noqa: F401
from deployflag import __version__
from deployflag.messages import TrainingResult, encode_json_reply, validate_request
from deployflag.pipeline import compute
from deployflag.settings import Settings
from deployflag.store.engine import create_engine
from deployflag.store.repository import Store

TRAINING_TASK = "deployflag.contrib.ocave.tasks.process_data_from_ocave"
WARM_UP = Path(__file__).resolve().parent.parent / "examples" / "worked-example.json"

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
EXCHANGE = os.environ.get("BENCH_EXCHANGE", "deployflag")
TRAINING_QUEUE = os.environ.get("BENCH_TRAINING_QUEUE", "deployflag_training")
RESULT_QUEUE = os.environ.get("BENCH_RESULT_QUEUE", "deployflag_save_result")
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "sqlite+aiosqlite:///celery-baseline.db")

settings = Settings(  # type: ignore[call-arg]
    _env_file=None,
    amqp_url=AMQP_URL,
    database_url=DATABASE_URL,
    exchange=EXCHANGE,
    training_queue=TRAINING_QUEUE,
    result_queue=RESULT_QUEUE,
)
config = settings.pipeline_config()

app = Celery("deployflag_baseline", broker=AMQP_URL)
direct = Exchange(EXCHANGE, type="direct", durable=True)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_ignore_result=True,
    task_queues=[Queue(TRAINING_QUEUE, direct, routing_key=TRAINING_QUEUE)],
    # The reply waits for the broker's confirm, as the service's does.
    broker_transport_options={"confirm_publish": True},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_enable_remote_control=False,
)

_loop: asyncio.AbstractEventLoop | None = None
_store: Store | None = None


async def _migrate() -> None:
    store = await Store.open(settings)  # brings the schema to head (SQLite)
    await store.close()


if os.environ.get("BENCH_MIGRATE", "1") == "1":
    # Once, in the parent, before the pool forks: children only connect.
    asyncio.run(_migrate())
# One computation in the parent, so that every child inherits warm libraries (first-call
# set-up in numpy, pydantic and the pipeline): the fairest start a forked child can get.
compute(validate_request(json.loads(WARM_UP.read_bytes())), config)


@worker_process_init.connect
def _open_store(**_: Any) -> None:
    """One event loop and one Store per worker process, kept for the process's life: with
    max_tasks_per_child=1 that is one task, as the original opened its database per process."""
    global _loop, _store
    _loop = asyncio.new_event_loop()
    _store = Store(create_engine(settings), settings)
    _loop.run_until_complete(_store.ping())


@worker_process_shutdown.connect
def _close_store(**_: Any) -> None:
    if _loop is not None and _store is not None:
        _loop.run_until_complete(_store.close())
        _loop.close()


@app.task(name=TRAINING_TASK, bind=True, acks_late=True)  # type: ignore[untyped-decorator]
def process_data_from_ocave(self: Any, ocave_date: dict[str, Any]) -> None:
    assert _loop is not None
    assert _store is not None
    request_id = str(self.request.id)
    claim = _loop.run_until_complete(_store.claim(request_id, ocave_date.get("repo_id")))
    if claim.status == "done":
        assert claim.result is not None
        result = TrainingResult.model_validate(claim.result)
    else:
        # pipeline.run(body) = parse + validate + compute; Celery has parsed the body already.
        computation = compute(validate_request(ocave_date), config)
        result = TrainingResult(
            **computation.model_dump(),
            request_id=request_id,
            deployflag_version=__version__,
            finished_at=datetime.now(UTC),
        )
        _loop.run_until_complete(_store.record_result(result, config))
    reply = encode_json_reply(result)
    with app.producer_pool.acquire(block=True) as producer:
        producer.publish(
            reply.body,
            exchange=EXCHANGE,
            routing_key=RESULT_QUEUE,
            content_type="application/json",
            content_encoding="utf-8",
            correlation_id=request_id,
            delivery_mode=2,
            mandatory=True,
            retry=True,
        )
