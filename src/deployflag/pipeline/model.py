"""Seed scoring's model: training and honest, time-ordered evaluation (docs/scoring.md).

One classifier per request on every shortcode's feature rows. The parameters are chosen by a
grid search on the older 80 % of the rows, scored on the newer 20 % (never on rows the model has
seen), then refitted on all rows. Estimator and folds are seeded. The pipeline starts no process
of its own (n_jobs=1) and leaves native threads to its caller: the service caps them per worker.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import precision_score, roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from deployflag.messages import ModelReport
from deployflag.pipeline.config import ModelSpec
from deployflag.pipeline.events import F64, I64
from deployflag.pipeline.features import CATEGORICAL, Features

NO_ROWS = "no_rows"
ONE_CLASS = "one_class"
TOO_FEW_ROWS = "too_few_rows_for_cv"
TRAIN_FRACTION = (4, 5)  # ⌊0.8·n⌋ rows, in exact integer arithmetic

# Fixed on top of the grid: native categories, and no early stopping (with it, the model would
# change character at 10,000 rows and hold back 10 % of them).
_HGB_BASE: dict[str, Any] = {"categorical_features": CATEGORICAL, "early_stopping": False}


def make_estimator(spec: ModelSpec, params: dict[str, Any]) -> Any:
    if spec.estimator != "HistGradientBoostingClassifier":
        raise ValueError(f"unsupported estimator {spec.estimator!r}")
    return HistGradientBoostingClassifier(
        **{**_HGB_BASE, "random_state": spec.random_state, **params}
    )


@dataclass(frozen=True, slots=True)
class Trained:
    report: ModelReport
    estimator: Any | None  # fitted on all rows; None when training was skipped

    def probabilities(self, x: F64) -> F64:
        if self.estimator is None or len(x) == 0:
            return np.zeros(len(x), dtype=np.float64)
        return np.asarray(self.estimator.predict_proba(x)[:, 1], dtype=np.float64)


def evaluation_order(features: Features) -> NDArray[np.intp]:
    """Rows by (timestamp, shortcode, historical before daily, event order).

    Inside a shortcode the event index already puts historical events before daily ones.
    """
    return np.lexsort((features.event, features.code, features.time)).astype(np.intp)


def one_class(y: I64) -> bool:
    """Whether ``y`` holds fewer than two distinct labels (cheaper than ``np.unique``)."""
    return len(y) == 0 or bool((y == y[0]).all())


def split(n: int) -> int:
    """Size of the training part: ⌊0.8·n⌋."""
    return n * TRAIN_FRACTION[0] // TRAIN_FRACTION[1]


def cv_ready(y: I64, folds: int) -> bool:
    """Both classes, each with at least one row per fold."""
    counts = np.bincount(y, minlength=2)
    return bool(counts.min() >= folds)


def skip_reason(y: I64, folds: int) -> str | None:
    if len(y) == 0:
        return NO_ROWS
    if one_class(y):
        return ONE_CLASS
    if not cv_ready(y, folds):
        return TOO_FEW_ROWS
    return None


def candidates(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = sorted(grid)
    return [dict(zip(keys, v, strict=True)) for v in itertools.product(*(grid[k] for k in keys))]


def choose(x: F64, y: I64, spec: ModelSpec) -> dict[str, Any]:
    """The grid point with the best cross-validated ROC AUC (the only one if there is one)."""
    points = candidates(spec.param_grid)
    if len(points) <= 1:  # nothing to choose: skip the folds' fits
        return points[0] if points else {}
    search = GridSearchCV(
        make_estimator(spec, {}),
        {k: list(v) for k, v in spec.param_grid.items()},
        scoring="roc_auc",
        cv=StratifiedKFold(n_splits=spec.cv_folds, shuffle=True, random_state=spec.random_state),
        n_jobs=1,
        refit=False,
    )
    search.fit(x, y)
    return dict(search.best_params_)


def evaluate(
    x: F64, y: I64, spec: ModelSpec
) -> tuple[dict[str, Any] | None, float | None, float | None]:
    """Choose parameters on the older rows and score them on the newer ones.

    Returns (chosen parameters or None, ROC AUC, precision); None where a part lacks a class
    or the older part cannot be cross-validated.
    """
    cut = split(len(y))
    y_train, y_test = y[:cut], y[cut:]
    if not cv_ready(y_train, spec.cv_folds):
        return None, None, None
    params = choose(x[:cut], y_train, spec)
    if one_class(y_test):
        return params, None, None
    model = make_estimator(spec, params).fit(x[:cut], y_train)
    p = model.predict_proba(x[cut:])[:, 1]
    auc = float(roc_auc_score(y_test, p))
    precision = float(precision_score(y_test, (p >= 0.5).astype(np.int64), zero_division=0.0))
    return params, round(auc, 4), round(precision, 4)


def prior_auc(features: Features) -> float | None:
    """Held-out ROC AUC of the per-shortcode prior, on the split `evaluate` uses: each
    shortcode's fix rate in the older part scores its rows in the newer part (the older part's
    overall rate for a shortcode it lacks). The bar a model has to clear; for the benchmark.
    """
    order = evaluation_order(features)
    code, y = features.code[order], features.label[order]
    cut = split(len(y))
    if cut == 0 or one_class(y[cut:]):
        return None
    n = int(code.max()) + 1
    rows = np.bincount(code[:cut], minlength=n)
    fixed = np.bincount(code[:cut], weights=y[:cut], minlength=n)
    rate = np.where(rows > 0, fixed / np.maximum(rows, 1), y[:cut].mean())
    return round(float(roc_auc_score(y[cut:], rate[code[cut:]])), 4)


def train(features: Features, spec: ModelSpec) -> Trained:
    started = time.perf_counter()
    order = evaluation_order(features)
    x, y = features.matrix()[order], features.label[order]
    reason = skip_reason(y, spec.cv_folds)
    if reason is not None:
        report = ModelReport(
            trained=False,
            skipped_reason=reason,
            estimator=spec.estimator,
            training_rows=len(y),
            training_seconds=round(time.perf_counter() - started, 4),
        )
        return Trained(report=report, estimator=None)
    params, auc, precision = evaluate(x, y, spec)
    if params is None:  # the older part could not be cross-validated: choose on all rows
        params = choose(x, y, spec)
    model = make_estimator(spec, params).fit(x, y)
    report = ModelReport(
        trained=True,
        estimator=type(model).__name__,
        parameters=_plain(params),
        roc_auc=auc,
        precision=precision,
        training_rows=len(y),
        training_seconds=round(time.perf_counter() - started, 4),
    )
    return Trained(report=report, estimator=model)


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe parameter values (numpy scalars become Python numbers)."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in params.items()}
