"""Fix-rate events: daily segments, historical drops and their rates (docs/pipeline.md)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import orjson

from deployflag.messages import parse_request, validate_request
from deployflag.pipeline import events
from tests.unit.rows import ROOT_EXAMPLES, daily, hist, listed, micros, request


def test_worked_example_events() -> None:
    req = parse_request((ROOT_EXAMPLES / "worked-example.json").read_bytes())
    assert listed(req) == [
        ("PYL-W0611", micros(10), 10, 0.2, "historical"),
        ("PYL-W0611", micros(40), 8, 0.5, "historical"),
        ("PYL-W0611", micros(16), 7, 0.5714, "daily"),
    ]


def test_micros_is_exact() -> None:
    ts = datetime(2021, 3, 4, 10, 11, 12, 123457, tzinfo=UTC)
    assert events.micros(ts) == 1614852672123457
    assert events.micros(datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)) == -1


# --- historical -------------------------------------------------------------------------------


def test_historical_all_equal_gives_one_event_at_the_last_row() -> None:
    req = request(historical=[hist(0, 4), hist(2, 4), hist(1, 4)])
    assert listed(req) == [("PYL-W0611", micros(2), 4, 0.0, "historical")]


def test_historical_single_row() -> None:
    assert listed(request(historical=[hist(3, 9)])) == [
        ("PYL-W0611", micros(3), 9, 0.0, "historical")
    ]


def test_historical_rising_only_gives_no_event() -> None:
    assert listed(request(historical=[hist(0, 1), hist(1, 2), hist(2, 2)])) == []


def test_historical_one_event_per_drop_sorted_by_time() -> None:
    # Payload order is not time order; the drop 9→6 is at day 2, 6→0 at day 3.
    req = request(historical=[hist(3, 0), hist(0, 5), hist(2, 6), hist(1, 9)])
    assert listed(req) == [
        ("PYL-W0611", micros(2), 9, 0.3333, "historical"),
        ("PYL-W0611", micros(3), 6, 1.0, "historical"),
    ]


def test_historical_zero_frequencies() -> None:
    assert listed(request(historical=[hist(0, 0), hist(1, 0)])) == [
        ("PYL-W0611", micros(1), 0, 0.0, "historical")
    ]
    assert listed(request(historical=[hist(0, 0), hist(1, 3)])) == []


def test_fix_rate_uses_python_round_not_numpy_round() -> None:
    # 1/160 = 0.00625: Python's round gives 0.0063, numpy's np.round gives 0.0062.
    assert float(np.round(1 / 160, 4)) == 0.0062
    assert listed(request(historical=[hist(0, 160), hist(1, 159)]))[0][3] == 0.0063
    assert listed(request([daily(0, 160), daily(1, 159)]))[0][3] == 0.0063


def test_equal_timestamps_keep_payload_order() -> None:
    # Same time: the stable sort keeps 5 before 3, so there is one drop 5→3.
    req = request(historical=[hist(0, 5), hist(0, 3)])
    assert listed(req) == [("PYL-W0611", micros(0), 5, 0.4, "historical")]
    req = request(historical=[hist(0, 3), hist(0, 5)])
    assert listed(req) == []


# --- daily ------------------------------------------------------------------------------------


def test_daily_segment_detected_and_resolved() -> None:
    # 5 → 7 → 3 → 4: detected 5 + 2 + 1 = 8, resolved 4.
    req = request([daily(0, 5), daily(1, 7), daily(2, 3), daily(3, 4)])
    assert listed(req) == [("PYL-W0611", micros(3), 8, 0.5, "daily")]


def test_daily_flat_segment() -> None:
    assert listed(request([daily(0, 2), daily(1, 2)])) == [
        ("PYL-W0611", micros(1), 2, 0.0, "daily")
    ]
    assert listed(request([daily(5, 0)])) == [("PYL-W0611", micros(5), 0, 0.0, "daily")]


def test_daily_rising_segment_has_fix_rate_zero() -> None:
    assert listed(request([daily(0, 1), daily(1, 4)])) == [
        ("PYL-W0611", micros(1), 4, 0.0, "daily")
    ]


def test_null_base_in_a_single_base_branch_is_its_value() -> None:
    # Only null: one segment of all rows.
    req = request([daily(0, 4, base=None), daily(1, 1, base=None)])
    assert listed(req) == [("PYL-W0611", micros(1), 4, 0.75, "daily")]


def test_null_and_one_base_make_a_multi_base_branch() -> None:
    # {None, "a1"} are two distinct values: the null rows are dropped, "a1" is one segment.
    req = request([daily(0, 9, base=None), daily(1, 4), daily(2, 2), daily(3, 0, base=None)])
    assert listed(req) == [("PYL-W0611", micros(2), 4, 0.5, "daily")]


def test_multi_base_branch_segments_in_order_of_first_appearance() -> None:
    rows = [
        daily(5, 3, base="b2"),
        daily(0, 6, base="b1"),
        daily(7, 1, base="b2"),
        daily(2, 6, base="b1"),
        daily(3, 8, base=None),
        daily(8, 5, base="b1"),  # b1 resumes after b2 began: still b1's segment
    ]
    assert listed(request(rows)) == [
        ("PYL-W0611", micros(8), 6, 0.1667, "daily"),
        ("PYL-W0611", micros(7), 3, 0.6667, "daily"),
    ]


def test_branches_in_order_of_first_appearance_by_time() -> None:
    rows = [
        daily(4, 1, branch="zeta", base="z"),
        daily(1, 2, branch="beta", base="b"),
        daily(0, 3, branch="zeta", base="z"),
    ]
    # zeta first appears at day 0, beta at day 1; a branch is its own segment.
    assert listed(request(rows)) == [
        ("PYL-W0611", micros(4), 3, 0.6667, "daily"),
        ("PYL-W0611", micros(1), 2, 0.0, "daily"),
    ]


def test_same_base_on_two_branches_is_two_segments() -> None:
    rows = [daily(0, 3, branch="x"), daily(1, 1, branch="y"), daily(2, 2, branch="x")]
    assert listed(request(rows)) == [
        ("PYL-W0611", micros(2), 3, 0.3333, "daily"),
        ("PYL-W0611", micros(1), 1, 0.0, "daily"),
    ]


# --- listing ----------------------------------------------------------------------------------


def test_historical_first_then_daily_per_shortcode_sorted_by_shortcode() -> None:
    req = request(
        [daily(0, 1, shortcode="B"), daily(1, 0, shortcode="A")],
        [hist(5, 2, shortcode="B"), hist(6, 1, shortcode="B"), hist(9, 7, shortcode="A")],
    )
    assert listed(req) == [
        ("A", micros(9), 7, 0.0, "historical"),
        ("A", micros(1), 0, 0.0, "daily"),
        ("B", micros(6), 2, 0.5, "historical"),
        ("B", micros(0), 1, 0.0, "daily"),
    ]


def test_a_shortcode_can_have_no_event() -> None:
    req = request(historical=[hist(0, 1, shortcode="A"), hist(1, 2, shortcode="A")])
    cols = events.columns(req)
    assert cols.shortcodes == ("A",)
    assert len(events.build(cols)) == 0


def test_empty_request_has_no_events() -> None:
    cols = events.columns(request())
    assert cols.shortcodes == ()
    assert len(events.build(cols)) == 0


def test_rows_as_columns() -> None:
    req = validate_request(
        orjson.loads(orjson.dumps({"repo_id": "r", "analysis_run": [], "historical_run": []}))
    )
    cols = events.columns(req)
    assert cols.daily_code.dtype == np.int64
    assert cols.hist_time.dtype == np.int64
    req = request([daily(0, 1, base=None, shortcode="Z"), daily(1, 1, shortcode="Y")])
    cols = events.columns(req)
    assert cols.shortcodes == ("Y", "Z")
    assert cols.daily_code.tolist() == [1, 0]
    assert cols.daily_base.tolist() == [events.NULL, 1]


def test_stable_order_is_stable() -> None:
    a = np.array([1, 0, 1, 0])
    b = np.array([5, 5, 5, 5])
    assert events.stable_order(a, b).tolist() == [1, 3, 0, 2]
