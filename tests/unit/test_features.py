"""Feature rows and the per-shortcode type and severity (docs/pipeline.md)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployflag.messages import parse_request
from deployflag.pipeline import events, features
from deployflag.pipeline.features import LAST_FIXED, QUANTILES, severity_score, type_category
from tests.unit.rows import ROOT_EXAMPLES, build_features, daily, hist, request


def named(f: features.Features) -> dict[str, list[object]]:
    return {
        "days_after_first_seen": f.days_after_first_seen.tolist(),
        "days_after_last_seen": f.days_after_last_seen.tolist(),
        "last_fix_rate": f.last_fix_rate.tolist(),
        "last_2_fix_rate": f.last_2_fix_rate.tolist(),
        "days_after_last_fixed": [LAST_FIXED[i] for i in f.days_after_last_fixed.tolist()],
        "freq_detected_quantile": [QUANTILES[i] for i in f.freq_detected_quantile.tolist()],
        "label": f.label.tolist(),
    }


def test_worked_example_features() -> None:
    f = build_features(parse_request((ROOT_EXAMPLES / "worked-example.json").read_bytes()))
    assert named(f) == {
        "days_after_first_seen": [0, 6, 30],
        "days_after_last_seen": [0, 6, 24],
        "last_fix_rate": [0.0, 0.2, 0.5714],
        "last_2_fix_rate": [0.0, 0.0, 0.2],
        "days_after_last_fixed": ["Never", "Short", "Long"],
        "freq_detected_quantile": ["high", "low", "medium_high"],
        "label": [1, 1, 1],
    }
    assert f.frequency_detected.tolist() == [10, 7, 8]
    assert f.severity_score.tolist() == [60, 60, 60]
    assert [features.TYPE_CATEGORIES[t] for t in f.type.tolist()] == ["antipattern"] * 3
    assert f.month.tolist() == [1, 1, 2]
    assert f.quarter.tolist() == [1, 1, 1]
    assert f.daily.tolist() == [False, True, False]
    assert f.matrix().shape == (3, len(features.FEATURE_NAMES))


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("Anti-pattern", "antipattern"),
        ("antipattern", "antipattern"),
        ("Bug risk", "bug-risk"),
        ("bug-risk", "bug-risk"),
        ("BUG_RISK", "bug-risk"),
        ("Performance", "performance"),
        ("Security", "security"),
        ("style", "style"),
        ("Doc", "doc"),
        ("Documentation", "doc"),
        ("Type check", "typecheck"),
        ("type-check", "typecheck"),
        ("Coverage", "coverage"),
        ("Secrets", "other"),
        ("bug risk 2", "bug-risk"),  # digits are dropped with the rest
        ("", "other"),
        (None, "other"),
    ],
)
def test_type_category(text: str | None, category: str) -> None:
    assert type_category(text) == category


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("critical", 82),
        ("CRITICAL", 82),
        ("Major", 60),
        ("minor", 25),
        ("info", 0),
        ("", 0),
        (None, 0),
        (" major", 0),  # case-insensitive, nothing more
    ],
)
def test_severity_score(text: str | None, score: int) -> None:
    assert severity_score(text) == score


def test_type_and_severity_from_the_first_analysis_row_in_payload_order() -> None:
    req = request(
        [
            daily(5, 1, shortcode="A", issue_type="Style", severity="minor"),
            daily(0, 1, shortcode="A", issue_type="Security", severity="critical"),
        ],
        [hist(0, 1, shortcode="A", issue_type="Performance", severity="major")],
    )
    info = features.shortcode_info(req, events.columns(req))
    assert features.TYPE_CATEGORIES[int(info.type[0])] == "style"
    assert info.severity.tolist() == [25]


def test_type_and_severity_from_the_first_historical_row_without_analysis_rows() -> None:
    req = request(
        [daily(0, 1, shortcode="B", severity="minor")],
        [
            hist(3, 1, shortcode="A", issue_type="Bug risk", severity="critical"),
            hist(1, 1, shortcode="A", issue_type="Style", severity="minor"),
        ],
    )
    info = features.shortcode_info(req, events.columns(req))
    assert info.names == ("A", "B")
    assert [features.TYPE_CATEGORIES[t] for t in info.type.tolist()] == ["bug-risk", "antipattern"]
    assert info.severity.tolist() == [82, 25]


def test_long_gap_threshold_is_inclusive() -> None:
    # Events at day 0 (fix), day 20 and day 39 (a daily segment each, all fixed).
    rows = [
        daily(-1, 2, branch="a"),
        daily(0, 1, branch="a"),
        daily(19, 2, branch="b"),
        daily(20, 1, branch="b"),
        daily(38, 2, branch="c"),
        daily(39, 1, branch="c"),
    ]
    f = build_features(request(rows))
    assert named(f)["days_after_last_fixed"] == ["Never", "Long", "Short"]
    f = build_features(request(rows), long_gap_days=21)
    assert named(f)["days_after_last_fixed"] == ["Never", "Short", "Short"]


def test_last_fixed_skips_unfixed_events_and_other_shortcodes() -> None:
    rows = [
        daily(0, 1, shortcode="A", branch="a"),
        daily(1, 0, shortcode="A", branch="a"),  # A fixed at day 1
        daily(2, 5, shortcode="B", branch="b"),  # B never fixed
        daily(30, 1, shortcode="A", branch="c"),  # A unfixed at day 30
        daily(31, 1, shortcode="A", branch="d"),  # A: latest fix was day 1 → Long
    ]
    f = build_features(request(rows))
    assert f.code.tolist() == [0, 0, 0, 1]
    assert named(f)["days_after_last_fixed"] == ["Never", "Long", "Long", "Never"]
    assert named(f)["last_fix_rate"] == [0.0, 1.0, 0.0, 0.0]
    assert named(f)["last_2_fix_rate"] == [0.0, 0.0, 1.0, 0.0]


def test_equal_timestamps_keep_event_order() -> None:
    # A historical and a daily event at the same time: historical first.
    req = request([daily(0, 2), daily(5, 2)], [hist(0, 4), hist(5, 2)])
    f = build_features(req)
    assert f.daily.tolist() == [False, True]
    assert f.days_after_last_seen.tolist() == [0, 0]
    assert named(f)["days_after_last_fixed"] == ["Never", "Short"]


def test_whole_days_round_down() -> None:
    # Drop events at day 0.5 and day 3.49: 2.99 days apart count as 2.
    f = build_features(request(historical=[hist(0, 3), hist(0.5, 2), hist(3.49, 1)]))
    assert f.days_after_first_seen.tolist() == [0, 2]
    assert f.days_after_last_seen.tolist() == [0, 2]


def test_all_equal_frequencies_are_all_high() -> None:
    rows = [daily(0, 3, branch=b) for b in "abcd"]
    f = build_features(request(rows))
    assert named(f)["freq_detected_quantile"] == ["high"] * 4


def test_single_event() -> None:
    f = build_features(request(historical=[hist(40, 3)]))
    assert named(f) == {
        "days_after_first_seen": [0],
        "days_after_last_seen": [0],
        "last_fix_rate": [0.0],
        "last_2_fix_rate": [0.0],
        "days_after_last_fixed": ["Never"],
        "freq_detected_quantile": ["high"],
        "label": [0],
    }
    assert f.month.tolist() == [2]
    assert f.quarter.tolist() == [1]


def test_no_events_give_an_empty_matrix() -> None:
    f = build_features(request(historical=[hist(0, 1), hist(1, 2)]))
    assert len(f) == 0
    assert f.matrix().shape == (0, len(features.FEATURE_NAMES))
    codes, latest = f.latest()
    assert codes.tolist() == []
    assert latest.tolist() == []


def test_latest_row_per_shortcode() -> None:
    req = request([daily(3, 1, shortcode="B"), daily(0, 1, shortcode="A")], [hist(9, 1)])
    codes, latest = build_features(req).latest()
    assert codes.tolist() == [0, 1, 2]  # A, B, PYL-W0611
    assert latest.tolist() == [0, 1, 2]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=12), min_size=1, max_size=8))
def test_quantile_bins_match_numpy_per_shortcode(groups: list[list[int]]) -> None:
    values = np.array([v for g in groups for v in g], dtype=np.int64)
    starts = np.cumsum([0] + [len(g) for g in groups[:-1]]).astype(np.intp)
    got = features._quantile_bins(values, starts).tolist()
    expected: list[int] = []
    for g in groups:
        q25, q50, q75 = np.quantile(np.array(g), [0.25, 0.5, 0.75])
        expected += [3 if v >= q75 else 2 if v >= q50 else 1 if v >= q25 else 0 for v in g]
    assert got == expected


def test_issue_categories_are_capped_for_the_model() -> None:
    code = np.repeat(np.arange(300), np.arange(300, 0, -1)).astype(np.int64)
    capped = features.issue_categories(code)
    assert np.unique(capped).size == features.MAX_CATEGORIES
    assert (capped[code < 254] == code[code < 254]).all()  # the most frequent keep their own
    assert (capped[code >= 254] == 300).all()
    small = np.array([0, 5, 5], dtype=np.int64)
    assert features.issue_categories(small) is small
