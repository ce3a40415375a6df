"""What the pure pipeline needs to know, and nothing else (picklable, sent to workers)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

# The default grid is small on purpose: benchmarks/bench_pipeline.py shows that larger grids gain
# nothing in held-out ROC AUC on time-ordered rows, at several times the cost.
DEFAULT_PARAM_GRID: dict[str, list[Any]] = {
    "learning_rate": [0.05],
    "max_depth": [3],
    "max_iter": [200],
    "l2_regularization": [1.0],
    "min_samples_leaf": [20],
}


class Weights(BaseModel):
    """Score = w1·daily + w2·historical + w3·fix_probability + w4·severity (seed scoring)."""

    model_config = ConfigDict(frozen=True)

    w1: float = Field(0.3, ge=0, le=1)
    w2: float = Field(0.3, ge=0, le=1)
    w3: float = Field(0.2, ge=0, le=1)
    w4: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> Weights:
        total = self.w1 + self.w2 + self.w3 + self.w4
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"weights w1..w4 must sum to 1, they sum to {total:g}")
        return self


class ModelSpec(BaseModel):
    """The estimator, its grid and its cross-validation: versioned in the metadata tables."""

    model_config = ConfigDict(frozen=True)

    estimator: str = "HistGradientBoostingClassifier"
    param_grid: dict[str, list[Any]] = Field(default_factory=lambda: dict(DEFAULT_PARAM_GRID))
    cv_folds: int = Field(2, ge=2, le=10)
    random_state: int = 0
    objective: str = "binary:log_loss"
    eval_metric: str = "roc_auc"

    @property
    def grid_version(self) -> str:
        """Short content hash of everything that defines the search; stable across processes."""
        canonical = json.dumps(
            {
                "estimator": self.estimator,
                "grid": self.param_grid,
                "cv": self.cv_folds,
                "seed": self.random_state,
            },
            sort_keys=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


Scoring = Literal["forecast", "seed"]
# "none" (every event counts alike), "auto" (a per-request backtest picks) or a half-life in days.
Recency = Literal["auto", "none"] | PositiveFloat


class ForecastSpec(BaseModel):
    """The forecast scoring's model: a standardised logistic regression (fixed, not searched)."""

    model_config = ConfigDict(frozen=True)

    estimator: str = "LogisticRegression"
    C: float = 1.0
    solver: str = "lbfgs"
    max_iter: int = 200
    objective: str = "binary:log_loss"
    eval_metric: str = "roc_auc"

    @property
    def parameters(self) -> dict[str, Any]:
        return {"C": self.C, "solver": self.solver, "max_iter": self.max_iter}

    @property
    def grid_version(self) -> str:
        canonical = json.dumps({"estimator": self.estimator, **self.parameters}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class PipelineConfig(BaseModel):
    """Everything `pipeline.run` reads: which scoring, its knobs, and the model specifications."""

    model_config = ConfigDict(frozen=True)

    scoring: Scoring = "forecast"
    weights: Weights = Field(default_factory=Weights)
    long_gap_days: int = Field(20, ge=0)
    model: ModelSpec = Field(default_factory=ModelSpec)
    # --- forecast scoring only ---
    forecast: ForecastSpec = Field(default_factory=ForecastSpec)
    recency: Recency = "auto"
    model_weight: float = Field(0.0, ge=0, le=1)
    prior_strength: float = Field(20.0, gt=0)

    def model_definition(self) -> tuple[str, str, str, dict[str, Any]]:
        """(version, objective, eval_metric, parameters) of the model this scoring trains: the
        row of ``grid_search_parameter`` that a result points at."""
        if self.scoring == "seed":
            spec = self.model
            parameters = {
                "grid": spec.param_grid,
                "cv_folds": spec.cv_folds,
                "random_state": spec.random_state,
            }
            return spec.grid_version, spec.objective, spec.eval_metric, parameters
        f = self.forecast
        return (
            f.grid_version,
            f.objective,
            f.eval_metric,
            {"estimator": f.estimator, **f.parameters},
        )
