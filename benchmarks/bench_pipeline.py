"""Benchmark of the pure pipeline: ranking quality of both scorings against a known truth,
seconds per stage, peak memory, model quality, grid sizes.

    python benchmarks/bench_pipeline.py [--runs 5] [--threads 1] [--payloads 10] [--quick]

Each measurement runs in a fresh interpreter that reads a synthetic payload from a file, so its
peak RSS is that of one service worker on one request: interpreter, numpy and scikit-learn,
the raw body, and the computation. Native threads are capped as the service caps them (1 per
worker). Prints a markdown report and writes it to benchmarks/results/pipeline.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "pipeline.md"
SIZES = ("small", "reference", "large")
# Candidates around the default (learning_rate 0.1, max_depth 3, max_iter 100, l2 1, leaf 20).
LARGER_GRID: dict[str, list[Any]] = {
    "learning_rate": [0.05, 0.1, 0.2],
    "max_depth": [2, 3, 5],
    "max_iter": [100, 300],
    "l2_regularization": [1.0],
    "min_samples_leaf": [20],
}


# --- child processes ----------------------------------------------------------------------------


def child_stages(path: str, runs: int, threads: int) -> dict[str, Any]:
    """Seed scoring: per run each stage timed, then `run()` end to end; plus quality and RSS."""
    from threadpoolctl import threadpool_limits

    from deployflag.messages import parse_request
    from deployflag.pipeline import events, features, model, run, scoring
    from deployflag.pipeline.config import PipelineConfig

    config = PipelineConfig(scoring="seed")
    body = Path(path).read_bytes()
    stages = ("parse", "features", "training", "weights", "end_to_end")
    times: dict[str, list[float]] = {k: [] for k in stages}
    with threadpool_limits(limits=threads):
        run(body, config)  # warm-up, as in the forecast child
        for _ in range(runs):
            clock = [time.perf_counter()]
            req = parse_request(body)
            clock.append(time.perf_counter())
            cols = events.columns(req)
            info = features.shortcode_info(req, cols)
            rows = features.build(events.build(cols), info, config.long_gap_days)
            clock.append(time.perf_counter())
            trained = model.train(rows, config.model)
            clock.append(time.perf_counter())
            p = scoring.fix_probabilities(rows, trained, len(info.names))
            scoring.scores(rows, info, p, config.weights)
            clock.append(time.perf_counter())
            del req, cols
            result = run(body, config)
            clock.append(time.perf_counter())
            for name, start, end in zip(stages, clock[:-1], clock[1:], strict=True):
                times[name].append(end - start)
    return {
        "medians": {k: statistics.median(v) for k, v in times.items()},
        "runs": runs,
        "bytes": len(body),
        "feature_rows": len(rows),
        "shortcodes": len(info.names),
        "auc": result.model.roc_auc,
        "prior_auc": model.prior_auc(rows),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def child_forecast(path: str, runs: int, threads: int) -> dict[str, Any]:
    """Forecast scoring (the default): parse, then the computation, then `run()` end to end."""
    from threadpoolctl import threadpool_limits

    from deployflag.messages import parse_request
    from deployflag.pipeline import compute, run
    from deployflag.pipeline.config import PipelineConfig

    config = PipelineConfig()
    body = Path(path).read_bytes()
    stages = ("parse", "compute", "training", "end_to_end", "end_to_end_cpu")
    times: dict[str, list[float]] = {k: [] for k in stages}
    with threadpool_limits(limits=threads):
        run(body, config)  # warm-up: the first call imports the model's modules
        for _ in range(runs):
            started = time.perf_counter()
            req = parse_request(body)
            parsed = time.perf_counter()
            result = compute(req, config)
            computed = time.perf_counter()
            del req
            cpu = time.process_time()
            run(body, config)
            times["end_to_end_cpu"].append(time.process_time() - cpu)
            times["parse"].append(parsed - started)
            times["compute"].append(computed - parsed)
            times["training"].append(result.model.training_seconds)
            times["end_to_end"].append(time.perf_counter() - computed)
    return {
        "medians": {k: statistics.median(v) for k, v in times.items()},
        "rows": result.model.training_rows,
        "auc": result.model.roc_auc,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


QUALITY_SCORINGS = ("seed", "forecast", "forecast_none")


def child_quality(size: str, kind: str, payloads: int, threads: int) -> list[dict[str, Any]]:
    """Per payload with a known truth: each scoring's Spearman with it and its seconds, the
    half-life `auto` chose, and whether the user's backtest prefers the scoring the truth does."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from deployflag.messages import validate_request
    from deployflag.pipeline import backtest, compute
    from deployflag.pipeline.config import PipelineConfig
    from deployflag.pipeline.fix_rate import spearman
    from deployflag.synthetic import Size, generate_with_truth

    configs = {
        "seed": PipelineConfig(scoring="seed"),
        "forecast": PipelineConfig(),
        "forecast_none": PipelineConfig(recency="none"),
    }
    out = []
    with threadpool_limits(limits=threads):
        for seed in range(1, payloads + 1):
            payload, truth = generate_with_truth(cast(Size, size), seed=seed, drift=kind == "drift")
            req = validate_request(payload)
            names = sorted(truth)
            row: dict[str, Any] = {"seed": seed}
            for name, config in configs.items():
                started = time.perf_counter()
                result = compute(req, config)
                row[f"{name}_seconds"] = time.perf_counter() - started
                weight = {s.issue_shortcode: s.issue_weight for s in result.scores}
                row[name] = spearman(
                    np.asarray([weight[c] for c in names], dtype=float),
                    np.asarray([truth[c] for c in names]),
                )
                if name == "forecast":
                    row["half_life"] = result.model.half_life_days
            report = backtest.run(req, PipelineConfig())
            by = {(c.scoring, c.recency, c.model_weight): c.spearman for c in report.candidates}
            bt_seed, bt_forecast = by[("seed", None, None)], by[("forecast", "auto", 0.0)]
            row["backtest_agrees"] = (
                None
                if bt_seed is None or bt_forecast is None
                else (bt_forecast >= bt_seed) == ((row["forecast"] or 0) >= (row["seed"] or 0))
            )
            out.append(row)
    return out


def child_grid(path: str, threads: int) -> dict[str, Any]:
    """Held-out AUC, training seconds and chosen parameters: default grid vs LARGER_GRID."""
    from threadpoolctl import threadpool_limits

    from deployflag.messages import parse_request
    from deployflag.pipeline import events, features, model
    from deployflag.pipeline.config import ModelSpec

    req = parse_request(Path(path).read_bytes())
    cols = events.columns(req)
    rows = features.build(events.build(cols), features.shortcode_info(req, cols), 20)
    out: dict[str, Any] = {"prior_auc": model.prior_auc(rows), "xgboost": _original_xgboost(rows)}
    with threadpool_limits(limits=threads):
        for name, spec in (("default", ModelSpec()), ("larger", ModelSpec(param_grid=LARGER_GRID))):
            started = time.perf_counter()
            trained = model.train(rows, spec)
            seconds = time.perf_counter() - started
            out[name] = {
                "auc": trained.report.roc_auc,
                "seconds": seconds,
                "parameters": trained.report.parameters,
            }
    return out


def _original_xgboost(rows: Any) -> dict[str, Any] | None:
    """The replaced service's model — XGBoost, 600 trees, depth 10, learning rate 0.01 — fitted
    on the same older 80 % of the same feature rows and scored on the same newer 20 %, with one
    thread like the service's workers. None when xgboost is not installed (it is a dev extra)."""
    try:
        from xgboost import XGBClassifier
    except ImportError:
        return None
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from deployflag.pipeline import model

    order = model.evaluation_order(rows)
    x, y = rows.matrix()[order], rows.label[order]
    cut = model.split(len(y))
    if np.unique(y[:cut]).size < 2 or np.unique(y[cut:]).size < 2:
        return None
    started = time.perf_counter()
    xgb = XGBClassifier(
        n_estimators=600, max_depth=10, learning_rate=0.01, n_jobs=1, random_state=0,
        tree_method="hist", eval_metric="auc",
    )  # fmt: skip
    xgb.fit(x[:cut], y[:cut])
    auc = float(roc_auc_score(y[cut:], xgb.predict_proba(x[cut:])[:, 1]))
    return {"auc": round(auc, 4), "seconds": time.perf_counter() - started}


# --- the parent ---------------------------------------------------------------------------------


def _payload(size: str, seed: int, folder: Path) -> Path:
    import orjson

    from deployflag.synthetic import Size, generate

    path = folder / f"{size}-{seed}.json"
    if not path.exists():
        path.write_bytes(orjson.dumps(generate(cast(Size, size), seed=seed)))
    return path


def _child(*args: str) -> Any:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout)


def _versions() -> str:
    import numpy
    import sklearn

    return (
        f"Python {platform.python_version()}, numpy {numpy.__version__}, "
        f"scikit-learn {sklearn.__version__}; {os.cpu_count()} CPUs ({platform.machine()})"
    )


def _load() -> str:
    """The 1-minute load average, and the cores, beside the seconds it skews."""
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def quality(args: argparse.Namespace, sizes: tuple[str, ...]) -> list[str]:
    lines = [
        "## Ranking quality against a known truth",
        "",
        f"{args.payloads} synthetic payloads per size and kind (seeds 1–{args.payloads}), each "
        "with every shortcode's latent fix propensity written beside it (`python -m "
        "deployflag.synthetic --truth FILE`); *drift*: propensities move over the time span and "
        "the truth is their value at the end. Spearman of `issue_weight` with the truth, mean "
        "over payloads. *forecast* is the default (recency auto); *none* is forecast with "
        "`DEPLOYFLAG_RECENCY=none`. *backtest agrees*: payloads where `deployflag backtest` "
        "prefers the scoring (seed or forecast) that the truth prefers. Seconds: median of "
        "`compute` per payload, one thread.",
        "",
        "| size | kind | seed | forecast | none | forecast > seed | auto − none | auto chose 60 d "
        "| backtest agrees | seed s | forecast s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        for kind in ("stationary", "drift"):
            rows: list[dict[str, Any]] = _child(
                "quality", size, kind, str(args.payloads), str(args.threads)
            )
            mean = {k: _mean([r[k] for r in rows]) for k in QUALITY_SCORINGS}
            better = sum((r["forecast"] or 0) > (r["seed"] or 0) for r in rows)
            auto_gain = (mean["forecast"] or 0) - (mean["forecast_none"] or 0)
            agrees = [r["backtest_agrees"] for r in rows if r["backtest_agrees"] is not None]
            lines.append(
                f"| {size} | {kind} | {_f(mean['seed'])} | **{_f(mean['forecast'])}** "
                f"| {_f(mean['forecast_none'])} | {better} of {len(rows)} | {auto_gain:+.3f} "
                f"| {sum(r['half_life'] is not None for r in rows)} of {len(rows)} "
                f"| {sum(agrees)} of {len(agrees)} "
                f"| {_f(statistics.median(r['seed_seconds'] for r in rows), 2)} "
                f"| {_f(statistics.median(r['forecast_seconds'] for r in rows), 2)} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return [*lines, ""]


def report(args: argparse.Namespace) -> str:
    sizes = ("small", "reference") if args.quick else SIZES
    lines = [
        "# Pipeline benchmark",
        "",
        f"`python benchmarks/bench_pipeline.py` — {_versions()}; "
        f"{args.threads} native thread(s) per process, as in a service worker. "
        "Seconds are medians; each size runs in a fresh process (peak RSS is that process's).",
        "",
        *quality(args, sizes),
        "## Seconds and memory: forecast scoring (the default) vs seed scoring",
        "",
        "Wall seconds, and the CPU seconds of the same end-to-end runs (this process's user + "
        "system time: on a shared machine it moves far less with other work than wall time). "
        f"Machine load when the table was made: {_load()}.",
        "",
        "| payload | forecast: parse + validate | computation | of it training | end to end "
        "| end to end, CPU | peak RSS | held-out AUC | seed: end to end | seed peak RSS "
        "| forecast / seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        seed_stages: dict[str, dict[str, Any]] = {}
        for size in sizes:
            path = _payload(size, 0, folder)
            runs = args.large_runs if size == "large" else args.runs
            f = _child("forecast", str(path), str(runs), str(args.threads))
            r = seed_stages[size] = _child("stages", str(path), str(runs), str(args.threads))
            fm, sm = f["medians"], r["medians"]
            lines.append(
                f"| {size} | {_f(fm['parse'])} | {_f(fm['compute'])} | {_f(fm['training'])} "
                f"| **{_f(fm['end_to_end'])}** | {_f(fm['end_to_end_cpu'])} "
                f"| {f['peak_rss_mb']:.0f} MB | {_f(f['auc'])} "
                f"| {_f(sm['end_to_end'])} | {r['peak_rss_mb']:.0f} MB "
                f"| {fm['end_to_end'] / sm['end_to_end']:.2f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
        lines += [
            "",
            "## Seed scoring, stage by stage",
            "",
            "| payload | rows in | feature rows | parse + validate | events + features "
            "| training | weights | end to end | peak RSS | held-out AUC | prior AUC |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for size, r in seed_stages.items():
            m = r["medians"]
            rows_in = {"small": "1,000 + 1,000", "reference": "8,000 + 7,000"}.get(
                size, "80,000 + 70,000"
            )
            lines.append(
                f"| {size} ({r['bytes'] / 1e6:.1f} MB, {r['shortcodes']} shortcodes) | {rows_in} "
                f"| {r['feature_rows']:,} | {_f(m['parse'])} | {_f(m['features'])} "
                f"| {_f(m['training'])} | {_f(m['weights'])} | **{_f(m['end_to_end'])}** "
                f"| {r['peak_rss_mb']:.0f} MB | {_f(r['auc'])} | {_f(r['prior_auc'])} |"
            )

        lines += [
            "",
            "## Default grid vs a larger grid",
            "",
            f"Larger grid: `{json.dumps(LARGER_GRID)}` ({_count(LARGER_GRID)} candidates, "
            "2-fold CV). Held-out ROC AUC on the newest 20 % of rows; seconds of training "
            "(search on the older 80 %, evaluation, refit on all rows).",
            "",
            "The replaced service's XGBoost (600 trees, depth 10, learning rate 0.01; one fit, "
            "without its 2-fold search, so its seconds are a lower bound) is scored on the same "
            "split.",
            "",
            "| payload | seed | prior AUC | default AUC | default s | larger AUC | larger s "
            "| larger grid chose | XGBoost AUC | XGBoost s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        grid_runs = [("reference", s) for s in (0, 1, 2)]
        if not args.quick:
            grid_runs = [("small", 0), ("small", 1)] + [("reference", s) for s in range(6)]
            grid_runs.append(("large", 0))
        versus: list[tuple[float, float]] = []  # (default AUC, XGBoost AUC) where both exist
        for size, seed in grid_runs:
            g = _child("grid", str(_payload(size, seed, folder)), str(args.threads))
            chosen = {k: v for k, v in g["larger"]["parameters"].items() if k in _varied()}
            xgb = g["xgboost"]
            if xgb and g["default"]["auc"] is not None:
                versus.append((g["default"]["auc"], xgb["auc"]))
            lines.append(
                f"| {size} | {seed} | {_f(g['prior_auc'])} | {_f(g['default']['auc'])} "
                f"| {_f(g['default']['seconds'], 2)} | {_f(g['larger']['auc'])} "
                f"| {_f(g['larger']['seconds'], 2)} | `{json.dumps(chosen)}` "
                f"| {_f(xgb['auc']) if xgb else '–'} | {_f(xgb['seconds'], 2) if xgb else '–'} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
        if versus:
            mean_default = sum(d for d, _ in versus) / len(versus)
            mean_xgb = sum(x for _, x in versus) / len(versus)
            lines += [
                "",
                f"Default vs the replaced XGBoost over these {len(versus)} payloads: mean held-out "
                f"AUC {mean_default:.3f} vs {mean_xgb:.3f}; the default is at least as good on "
                f"{sum(d >= x for d, x in versus)} of {len(versus)}.",
            ]
    return "\n".join(lines) + "\n"


def _count(grid: dict[str, list[Any]]) -> int:
    n = 1
    for values in grid.values():
        n *= len(values)
    return n


def _varied() -> set[str]:
    return {k for k, v in LARGER_GRID.items() if len(v) > 1}


# The variables the service's workers set (deployflag.worker.cap_threads), for every library.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _cap_native_threads(threads: int) -> None:
    """Cap native threads as a service worker does, before numpy or scikit-learn load.

    threadpool_limits alone caps only the libraries loaded when it is entered; the pipeline
    imports numpy, SciPy's OpenBLAS and scikit-learn's OpenMP lazily, inside it, so without
    these variables they ran with one thread per core and the fits were several times slower
    on a busy machine than in a worker.
    """
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, path, *rest = sys.argv[2:]
        _cap_native_threads(int(rest[-1]))  # every child takes the thread count last
        out: Any
        if kind == "stages":
            out = child_stages(path, int(rest[0]), int(rest[1]))
        elif kind == "forecast":
            out = child_forecast(path, int(rest[0]), int(rest[1]))
        elif kind == "quality":
            out = child_quality(path, rest[0], int(rest[1]), int(rest[2]))
        else:
            out = child_grid(path, int(rest[0]))
        print(json.dumps(out))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=9, help="runs of small and reference")
    parser.add_argument("--large-runs", type=int, default=5, help="runs of large")
    parser.add_argument("--threads", type=int, default=1, help="native threads per process")
    parser.add_argument("--quick", action="store_true", help="small and reference only")
    parser.add_argument(
        "--payloads", type=int, default=10, help="payloads per size and kind for ranking quality"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    text = report(args)
    text += f"\nWhole benchmark: {time.perf_counter() - started:.0f} s.\n"
    print(text)
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
