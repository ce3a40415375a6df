"""The decoder's contract over 10,000+ arbitrary deliveries (tests/unit runs a few hundred)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings

from tests.support.decoder_fuzz import (
    bodies,
    check_contract,
    content_types,
    header_tables,
    message_ids,
)

pytestmark = pytest.mark.faults

MANY = settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.timeout(900)
@MANY
@given(bodies, header_tables(), content_types, message_ids)
def test_ten_thousand_deliveries_decode_to_a_request_or_a_rejection(
    body: bytes, headers: dict[str, Any], content_type: str | None, message_id: str | None
) -> None:
    event(check_contract(body, headers, content_type, message_id))
