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


@pytest.fixture(scope="session")
def large_payload() -> bytes:
    """80,000 + 70,000 rows: seconds of training, for tests that need work in flight."""
    from deployflag.synthetic import generate

    return orjson.dumps(generate("large", seed=7))
