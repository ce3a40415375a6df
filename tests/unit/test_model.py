"""Training and honest, time-ordered evaluation (docs/pipeline.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from deployflag.messages import parse_request, validate_request
from deployflag.pipeline import model
from deployflag.pipeline.config import DEFAULT_PARAM_GRID, ModelSpec
from deployflag.synthetic import generate
from tests.unit.rows import ROOT_EXAMPLES, build_features, daily, hist, micros, one_thread, request

SPEC = ModelSpec()


@pytest.fixture(scope="module")
def small_x_y() -> tuple[np.ndarray, np.ndarray]:
    f = build_features(validate_request(generate("small", seed=3)))
    order = model.evaluation_order(f)
    return f.matrix()[order], f.label[order]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def test_no_rows() -> None:
    trained = model.train(build_features(request()), SPEC)
    assert trained.estimator is None
    assert trained.report.model_dump(exclude={"training_seconds"}) == {
        "trained": False,
        "skipped_reason": "no_rows",
        "estimator": "HistGradientBoostingClassifier",
        "parameters": {},
        "roc_auc": None,
        "precision": None,
        "training_rows": 0,
        # Forecast scoring's fields stay null under seed scoring.
        "half_life_days": None,
        "blend_weight": None,
        "backtest_spearman": None,
    }


def test_one_class() -> None:
    f = build_features(parse_request((ROOT_EXAMPLES / "worked-example.json").read_bytes()))
    report = model.train(f, SPEC).report
    assert (report.trained, report.skipped_reason, report.training_rows) == (False, "one_class", 3)


def test_too_few_rows_of_a_class_for_the_folds() -> None:
    # Three segments: one fixed, two not; 1 row of class 1 < 2 folds.
    rows = [daily(0, 2, branch="a"), daily(1, 1, branch="a"), daily(2, 1, branch="b")]
    rows.append(daily(3, 1, branch="c"))
    report = model.train(build_features(request(rows)), SPEC).report
    assert (report.trained, report.skipped_reason) == (False, "too_few_rows_for_cv")
    # Two rows of each class are enough for two folds.
    rows += [daily(4, 3, branch="d"), daily(5, 1, branch="d")]
    report = model.train(build_features(request(rows)), SPEC).report
    assert report.trained is True


def test_trains_on_the_sample_request() -> None:
    f = build_features(parse_request((ROOT_EXAMPLES / "sample-request.json").read_bytes()))
    trained = model.train(f, SPEC)
    report = trained.report
    assert report.trained is True
    assert report.skipped_reason is None
    assert report.estimator == "HistGradientBoostingClassifier"
    assert report.parameters == {k: v[0] for k, v in DEFAULT_PARAM_GRID.items()}
    json.dumps(report.model_dump())  # JSON-serialisable
    assert report.training_rows == len(f)
    assert report.roc_auc is not None
    assert 0.0 <= report.roc_auc <= 1.0
    assert report.precision is not None
    assert 0.0 <= report.precision <= 1.0
    p = trained.probabilities(f.matrix())
    assert ((p >= 0) & (p <= 1)).all()


def test_split_is_floor_of_four_fifths() -> None:
    assert [model.split(n) for n in (0, 1, 4, 5, 10, 11, 15, 35)] == [0, 0, 3, 4, 8, 8, 12, 28]


def test_evaluation_order_time_then_shortcode_then_historical_first() -> None:
    req = request(
        [daily(0, 1, shortcode="B"), daily(5, 1, shortcode="B"), daily(5, 1, shortcode="A")],
        [hist(5, 2, shortcode="B"), hist(6, 1, shortcode="B"), hist(5, 3, shortcode="A")],
    )
    f = build_features(req)
    order = model.evaluation_order(f)
    rows = [(int(f.time[i]), f.code[i].item(), bool(f.daily[i])) for i in order]
    assert rows == [
        (micros(5), 0, False),  # A historical (flat: at its last row)
        (micros(5), 0, True),  # A daily
        (micros(5), 1, True),  # B daily (segment ends on day 5)
        (micros(6), 1, False),  # B historical drop
    ]


def test_metrics_null_when_the_newer_part_has_one_class(
    small_x_y: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = small_x_y
    y = y.copy()
    y[model.split(len(y)) :] = 1
    params, auc, precision = model.evaluate(x, y, SPEC)
    assert params == {k: v[0] for k, v in DEFAULT_PARAM_GRID.items()}
    assert (auc, precision) == (None, None)


def test_metrics_null_and_search_on_all_rows_when_the_older_part_cannot_be_split(
    small_x_y: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = small_x_y
    y = np.ones_like(y)
    y[-3:] = 0  # every class-0 row is in the newer part
    assert model.evaluate(x, y, SPEC) == (None, None, None)


def test_evaluation_on_held_out_rows(small_x_y: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = small_x_y
    params, auc, precision = model.evaluate(x, y, SPEC)
    assert params is not None
    assert auc is not None
    assert precision is not None


def test_grid_search_chooses_from_the_grid_deterministically(
    small_x_y: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = small_x_y
    spec = ModelSpec(
        param_grid={"max_depth": [2, 4], "max_iter": [10, 30], "min_samples_leaf": [5]}
    )
    chosen = model.choose(x, y, spec)
    assert chosen["max_depth"] in (2, 4)
    assert chosen["max_iter"] in (10, 30)
    assert model.choose(x, y, spec) == chosen
    assert model.candidates(spec.param_grid)[0] == {
        "max_depth": 2,
        "max_iter": 10,
        "min_samples_leaf": 5,
    }


def test_unseen_shortcode_in_the_newer_part_is_no_warning() -> None:
    # Shortcode Z exists only in the newest rows; pytest turns any warning into an error.
    rows = []
    for i in range(20):
        rows += [daily(i, 3, branch=f"b{i}"), daily(i + 0.5, 3 - i % 2, branch=f"b{i}")]
    rows += [daily(30, 2, branch="z", shortcode="Z"), daily(31, 1, branch="z", shortcode="Z")]
    rows += [daily(32, 2, branch="y", shortcode="Z")]
    report = model.train(build_features(request(rows)), SPEC).report
    assert report.trained is True


def test_unsupported_estimator() -> None:
    with pytest.raises(ValueError, match="unsupported estimator"):
        model.make_estimator(ModelSpec(estimator="XGBClassifier"), {})


def test_same_request_same_model() -> None:
    f = build_features(parse_request((ROOT_EXAMPLES / "sample-request.json").read_bytes()))
    a, b = model.train(f, SPEC), model.train(f, SPEC)
    x = f.matrix()
    assert np.array_equal(a.probabilities(x), b.probabilities(x))
    assert a.report.roc_auc == b.report.roc_auc


def test_prior_auc() -> None:
    f = build_features(validate_request(generate("reference", seed=0)))
    prior = model.prior_auc(f)
    assert prior is not None
    assert 0.5 < prior < 1.0
    assert model.prior_auc(build_features(request())) is None
