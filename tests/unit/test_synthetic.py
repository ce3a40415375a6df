"""The synthetic request generator."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from deployflag import synthetic
from deployflag.messages import validate_request
from deployflag.pipeline import compute, model
from deployflag.pipeline.config import PipelineConfig
from deployflag.pipeline.fix_rate import spearman
from deployflag.synthetic import generate, generate_with_truth, main
from tests.unit.rows import ROOT_EXAMPLES, build_events, build_features, one_thread

ANALYSIS_FIELDS = {
    "repository_id",
    "run_id",
    "branch_name",
    "base_oid",
    "commit_oid",
    "check_id",
    "created_at",
    "shortcode",
    "frequency_detected",
    "frequency_resolved",
    "issue_type",
    "severity",
}
HISTORICAL_FIELDS = {
    "run_id",
    "base_oid",
    "timestamp",
    "shortcode",
    "frequency",
    "issue_type",
    "severity",
}
NAIVE_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return generate("reference", seed=0)


def test_small_shape() -> None:
    payload = generate("small", seed=1)
    assert len(payload["analysis_run"]) == 1_000
    assert len(payload["historical_run"]) == 1_000
    assert len({r["shortcode"] for r in payload["analysis_run"]}) == 5


def test_reference_shape(reference: dict[str, Any]) -> None:
    daily, hist = reference["analysis_run"], reference["historical_run"]
    assert (len(daily), len(hist)) == (8_000, 7_000)
    assert len({r["shortcode"] for r in daily} | {r["shortcode"] for r in hist}) == 15
    assert len({r["branch_name"] for r in daily}) == 10
    assert len({r["base_oid"] for r in daily} - {None}) == 20
    assert any(r["base_oid"] is None for r in daily)


def test_every_upstream_field_and_naive_timestamps(reference: dict[str, Any]) -> None:
    assert set(reference) == {"repo_id", "default_branch_name", "analysis_run", "historical_run"}
    for row in reference["analysis_run"]:
        assert set(row) == ANALYSIS_FIELDS
        assert NAIVE_ISO.match(row["created_at"])
    for row in reference["historical_run"]:
        assert set(row) == HISTORICAL_FIELDS
        assert NAIVE_ISO.match(row["timestamp"])
    validate_request(reference)


def test_frequency_resolved_follows_the_drops() -> None:
    payload = generate("tiny", seed=2)
    assert all(r["frequency_resolved"] >= 0 for r in payload["analysis_run"])
    assert any(r["frequency_resolved"] > 0 for r in payload["analysis_run"])


def test_same_seed_same_payload() -> None:
    assert generate("small", seed=4) == generate("small", seed=4)
    assert generate("small", seed=4) != generate("small", seed=5)


def test_never_fixed_cannot_train() -> None:
    payload = generate("small", seed=1, never_fixed=True)
    req = validate_request(payload)
    assert (build_events(req).fix_rate == 0).all()
    result = compute(req, PipelineConfig())
    assert result.model.trained is False
    assert result.model.skipped_reason == "one_class"
    assert len(result.scores) == 5


def test_the_model_beats_a_per_shortcode_prior(reference: dict[str, Any]) -> None:
    f = build_features(validate_request(reference))
    report = model.train(f, PipelineConfig().model).report
    prior = model.prior_auc(f)
    assert report.roc_auc is not None
    assert prior is not None
    assert report.roc_auc >= prior + 0.03


def test_sample_request_is_the_tiny_payload_and_trains() -> None:
    sample = (ROOT_EXAMPLES / "sample-request.json").read_bytes()
    # Regenerate with: python -m deployflag.synthetic --size tiny --seed 0 -o <file>
    assert orjson.loads(sample) == generate("tiny", seed=0)
    result = compute(validate_request(orjson.loads(sample)), PipelineConfig())
    assert result.model.trained is True


def test_main_writes_a_file(tmp_path: Path) -> None:
    out = tmp_path / "payload.json"
    assert main(["--size", "small", "--seed", "1", "--never-fixed", "-o", str(out)]) == 0
    assert orjson.loads(out.read_bytes()) == generate("small", seed=1, never_fixed=True)


def test_main_writes_to_stdout(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["--size", "tiny"]) == 0
    assert orjson.loads(capsysbinary.readouterr().out) == generate("tiny", seed=0)


def test_truth_names_every_shortcode_and_follows_type_and_severity() -> None:
    payload, truth = generate_with_truth("reference", seed=2)
    assert set(truth) == {r["shortcode"] for r in payload["historical_run"]}
    # Without drift the payload is the one generate() always gave for this seed
    assert payload == generate("reference", seed=2)
    # The truth is the type's and the severity's effect plus a little noise (sd 0.4)
    effects = dict(synthetic._TYPES) | dict(synthetic._SEVERITIES)
    rows = {r["shortcode"]: r for r in payload["historical_run"]}
    for code, value in truth.items():
        expected = effects[rows[code]["issue_type"]] + effects[rows[code]["severity"]]
        assert abs(value - expected) < 4 * 0.4


@pytest.mark.parametrize("seed", [1, 2])
def test_the_fixes_carry_the_truth(seed: int) -> None:
    """Clean-ups start more often the higher the propensity: the payload's own fix rates rank
    shortcodes close to the truth. (While clean-ups ignored the propensity, seed 1 gave 0.86
    here: most fixes said nothing about it.)"""
    payload, truth = generate_with_truth("reference", seed=seed)
    result = compute(validate_request(payload), PipelineConfig(recency="none"))
    rate = {s.issue_shortcode: s.fix_rate for s in result.scores}
    names = sorted(truth)
    rho = spearman(
        np.asarray([rate[c] for c in names], dtype=float),
        np.asarray([truth[c] for c in names]),
    )
    assert rho is not None
    assert rho > 0.9


def test_drift_moves_the_truth_and_the_payload() -> None:
    still_payload, still = generate_with_truth("small", seed=4)
    moved_payload, moved = generate_with_truth("small", seed=4, drift=True)
    assert set(moved) == set(still)
    assert moved != still  # the propensity at the end differs
    assert moved_payload != still_payload


def test_main_writes_the_truth_beside_the_payload(tmp_path: Path) -> None:
    out, truth = tmp_path / "payload.json", tmp_path / "truth.json"
    assert (
        main(["--size", "small", "--seed", "2", "--drift", "-o", str(out), "--truth", str(truth)])
        == 0
    )
    payload, expected = generate_with_truth("small", seed=2, drift=True)
    assert orjson.loads(out.read_bytes()) == payload
    assert orjson.loads(truth.read_bytes()) == expected
