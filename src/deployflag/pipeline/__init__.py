"""The pure computation: request in, weights and a model report out (docs/scoring.md).

Two scorings share parsing, validation and the event segmentation: ``forecast`` (the default)
and ``seed``, the original service's computation kept digit for digit. ``run`` and ``compute``
are module-level, picklable and free of I/O and global state, so the service can call them in
process-pool workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deployflag.messages import Computation, TrainingRequest, parse_request

if TYPE_CHECKING:
    from deployflag.pipeline import events, features
    from deployflag.pipeline.config import PipelineConfig

__all__ = ["compute", "run"]


def run(body: bytes, config: PipelineConfig) -> Computation:
    """Parse and validate a plain JSON request body, then compute (raises InvalidRequest)."""
    return compute(parse_request(body), config)


def compute(request: TrainingRequest, config: PipelineConfig) -> Computation:
    # Imported here, not at the top: `deployflag.pipeline.config` is read by the settings of
    # every process, and only the workers should pay for numpy and scikit-learn.
    from deployflag.pipeline import events, features, forecast

    cols = events.columns(request)
    info = features.shortcode_info(request, cols)
    if config.scoring == "forecast":
        return forecast.compute(request, cols, info, config)
    return compute_seed(request, cols, info, config)


def compute_seed(
    request: TrainingRequest,
    cols: events.Columns,
    info: features.Shortcodes,
    config: PipelineConfig,
) -> Computation:
    """The original service's computation (fix-rate events, features, gradient boosting)."""
    from deployflag.pipeline import events, features, model, scoring

    found = events.build(cols)
    rows = features.build(found, info, config.long_gap_days)
    trained = model.train(rows, config.model)
    probabilities = scoring.fix_probabilities(rows, trained, len(info.names))
    return Computation(
        repo_id=request.repo_id,
        scoring="seed",
        scores=scoring.scores(rows, info, probabilities, config.weights),
        model=trained.report,
    )
