"""Request payloads shared by the tests: the shipped examples and synthetic ones."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def worked_example() -> bytes:
    return (ROOT / "examples" / "worked-example.json").read_bytes()


@pytest.fixture(scope="session")
def sample_payload() -> bytes:
    return (ROOT / "examples" / "sample-request.json").read_bytes()


# Service settings under which the large payload trains for seconds (~4 CPU s: seed scoring with
# a 6-point grid). The default forecast scoring takes it in about a second, too short to be
# sure a test sees the job in flight before it ends.
SLOW_TRAINING = {
    "DEPLOYFLAG_SCORING": "seed",
    "DEPLOYFLAG_MODEL_PARAM_GRID": (
        '{"learning_rate":[0.1],"max_depth":[2,3,5],"max_iter":[100,300],'
        '"l2_regularization":[1.0],"min_samples_leaf":[20]}'
    ),
}


@pytest.fixture(scope="session")
def large_payload() -> bytes:
    """80,000 + 70,000 rows, for tests that need work in flight: start the service with
    :data:`SLOW_TRAINING`."""
    from deployflag.synthetic import generate

    return orjson.dumps(generate("large", seed=7))
