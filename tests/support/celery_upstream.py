"""A stock Celery app playing the upstream (Ocave): it sends training tasks and runs the result
task. A real `celery worker` subprocess loads it, configured from the environment:

    DEPLOYFLAG_AMQP_URL, DEPLOYFLAG_EXCHANGE, DEPLOYFLAG_TRAINING_QUEUE, DEPLOYFLAG_RESULT_QUEUE,
    UPSTREAM_RESULTS_DIR: where the result task writes what it received (one JSON file per call)
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

TRAINING_TASK = "deployflag.contrib.ocave.tasks.process_data_from_ocave"
RESULT_TASK = "contrib.deployflag.tasks.store_results_from_deployflag"


def make_app(amqp_url: str, exchange: str, training_queue: str, result_queue: str) -> Celery:
    app = Celery("ocave", broker=amqp_url)
    direct = Exchange(exchange, type="direct")
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_queues=[Queue(result_queue, direct, routing_key=result_queue)],
        task_routes={TRAINING_TASK: {"exchange": exchange, "routing_key": training_queue}},
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )

    @app.task(name=RESULT_TASK)  # type: ignore[misc]
    def store_results_from_deployflag(
        deployflag_results: list[dict[str, object]], repo_id: object
    ) -> None:
        """What the upstream does with a result: here, write it where the test can see it."""
        out = Path(os.environ["UPSTREAM_RESULTS_DIR"]) / f"{uuid.uuid4().hex}.json"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"deployflag_results": deployflag_results, "repo_id": repo_id}))
        tmp.rename(out)  # atomic: the test never reads half a file

    return app


app = make_app(
    os.environ.get("DEPLOYFLAG_AMQP_URL", "amqp://"),
    os.environ.get("DEPLOYFLAG_EXCHANGE", "deployflag"),
    os.environ.get("DEPLOYFLAG_TRAINING_QUEUE", "deployflag_training"),
    os.environ.get("DEPLOYFLAG_RESULT_QUEUE", "deployflag_save_result"),
)
