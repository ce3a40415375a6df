"""The people's table of `run --format table`: aligned, sorted by weight, every Score field."""

from __future__ import annotations

from deployflag.messages import Score
from deployflag.texttable import render, result_table, score_columns
from tests.support.store import make_result


def test_columns_follow_the_score_model() -> None:
    columns = score_columns()
    assert columns[:2] == ["issue_shortcode", "issue_weight"]
    assert set(columns) == set(Score.model_fields)


def test_numbers_right_aligned_text_left_aligned() -> None:
    table = render(["name", "n"], [["a", 5], ["bbbb", 1234]]).splitlines()
    assert table == ["name     n", "----  ----", "a        5", "bbbb  1234"]


def test_result_table_sorted_by_weight_with_the_model_under_it() -> None:
    result = make_result("r-1")
    low = result.scores[0].model_copy(update={"issue_shortcode": "ZZZ-1", "issue_weight": 3})
    high = result.scores[0].model_copy(update={"issue_shortcode": "AAA-1", "issue_weight": 90})
    result = result.model_copy(update={"scores": [low, result.scores[0], high]})
    lines = result_table(result).splitlines()
    body = [line.split()[0] for line in lines[4:7]]
    assert body == ["AAA-1", "PYL-W0611", "ZZZ-1"]
    widths = {len(line) for line in lines[2:7]}
    assert len(widths) == 1  # every row as wide as the heading: aligned
    assert any(line.startswith("model: HistGradientBoostingClassifier") for line in lines[7:])
    assert any("ROC AUC 0.7500" in line for line in lines)
