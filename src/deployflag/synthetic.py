"""Synthetic training requests in the exact shape of the upstream's (docs/protocol.md), for
tests, examples and benchmarks.

The data carry a learnable signal. Each shortcode has a latent fix propensity (log-odds) set by
its issue type and severity plus noise; on top of it a per-shortcode "heat" rises when the team
fixes occurrences (or starts a clean-up, which it does more often the higher the propensity) and
fades over a couple of weeks. The default branch
drops occurrences more often while hot, and a branch segment resolves some with a probability
that grows with the heat at its start and with the number of occurrences.

The propensity is the truth a scoring should rank by: :func:`generate_with_truth` returns it
beside the payload (``--truth FILE`` writes it). With ``drift`` the propensity moves linearly
over the time span, by a random amount per shortcode, and the truth is its value at the end.

    python -m deployflag.synthetic --size small --seed 1 [--drift] [--never-fixed] [-o FILE]
        [--truth FILE]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson

Size = Literal["tiny", "small", "reference", "large"]


@dataclass(frozen=True, slots=True)
class _Shape:
    analysis: int
    historical: int
    shortcodes: int
    branches: int
    bases: int
    days: int


_SHAPES: dict[str, _Shape] = {
    "tiny": _Shape(320, 280, 4, 6, 20, 180),  # examples/sample-request.json
    "small": _Shape(1_000, 1_000, 5, 4, 8, 365),
    "reference": _Shape(8_000, 7_000, 15, 10, 20, 730),
    "large": _Shape(80_000, 70_000, 60, 100, 200, 1_095),
}

REPO_ID = 12860
_START = datetime(2021, 1, 4, 8, 0, 0)
_US_PER_DAY = 86_400_000_000
_PREFIXES = ("PYL-W", "PYL-R", "PYL-C", "PTC-W", "BAN-B", "FLK-D", "GO-S", "GSC-G", "JS-", "SCC-")
# (upstream text, effect on the fix propensity's log-odds)
_TYPES = (
    ("Anti-pattern", 0.0),
    ("Bug risk", 0.9),
    ("Performance", 0.4),
    ("Security", 1.2),
    ("Style", -0.9),
    ("Documentation", -1.3),
    ("Type check", 0.3),
    ("Coverage", -0.5),
    ("Secrets", 0.6),  # not a known type: becomes "other"
)
_SEVERITIES = (("critical", 1.0), ("major", 0.4), ("minor", -0.4), ("info", -0.9))
_HEAT_DAYS = 14.0  # how fast the urge to fix fades


def _sigmoid(x: np.ndarray[Any, np.dtype[np.float64]]) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)


def _iso(micros: int) -> str:
    return (datetime(1970, 1, 1) + timedelta(microseconds=micros)).isoformat(
        timespec="microseconds"
    )


def _shortcodes(rng: np.random.Generator, n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        prefix = _PREFIXES[int(rng.integers(len(_PREFIXES)))]
        names.add(f"{prefix}{int(rng.integers(1, 9999)):04d}")
    return sorted(names)


def _times(rng: np.random.Generator, start: int, end: int, n: int) -> np.ndarray[Any, Any]:
    """n distinct sorted microsecond timestamps in [start, end)."""
    t = np.sort(rng.integers(start, end, n))
    return t + np.arange(n)  # distinct even if two draws collide


DRIFT_SD = 1.5  # spread of a shortcode's change of propensity (log-odds) over the time span


def generate(
    size: Size, *, seed: int = 0, never_fixed: bool = False, drift: bool = False
) -> dict[str, Any]:
    """A training request dict with every upstream field; timestamps without offset.

    ``never_fixed`` gives a request in which no frequency ever drops: no model can be trained.
    """
    return generate_with_truth(size, seed=seed, never_fixed=never_fixed, drift=drift)[0]


def generate_with_truth(
    size: Size, *, seed: int = 0, never_fixed: bool = False, drift: bool = False
) -> tuple[dict[str, Any], dict[str, float]]:
    """A request and each shortcode's true fix propensity (log-odds) at the end of its span.

    Without ``drift`` the same seed gives the same payload as it always did: the drift draws
    come from a generator of their own.
    """
    shape = _SHAPES[size]
    rng = np.random.default_rng(seed)
    codes = _shortcodes(rng, shape.shortcodes)
    k = len(codes)
    type_i = rng.choice(len(_TYPES), k, p=[0.2, 0.15, 0.1, 0.08, 0.2, 0.1, 0.07, 0.05, 0.05])
    sev_i = rng.choice(len(_SEVERITIES), k, p=[0.15, 0.4, 0.3, 0.15])
    propensity = (
        np.array([_TYPES[i][1] for i in type_i])
        + np.array([_SEVERITIES[i][1] for i in sev_i])
        + rng.normal(0.0, 0.4, k)
    )
    start = int((_START - datetime(1970, 1, 1)) / timedelta(microseconds=1))
    end = start + shape.days * _US_PER_DAY
    change = np.random.default_rng([seed, 1]).normal(0.0, DRIFT_SD, k) if drift else np.zeros(k)

    def propensity_at(t: int) -> np.ndarray[Any, np.dtype[np.float64]]:
        return np.asarray(propensity + change * ((t - start) / (end - start)), np.float64)

    # --- the default branch: one run covers every shortcode -------------------------------------
    n_hist_runs = math.ceil(shape.historical / k)
    hist_t = _times(rng, start, end, n_hist_runs)
    freq = np.zeros((n_hist_runs, k), dtype=np.int64)
    heat = np.zeros((n_hist_runs, k))
    f = rng.poisson(np.exp(rng.normal(2.3, 0.7, k))) + 2
    h = np.zeros(k)
    for r in range(n_hist_runs):
        gap = 0.0 if r == 0 else (hist_t[r] - hist_t[r - 1]) / _US_PER_DAY
        h = h * math.exp(-gap / _HEAT_DAYS)
        now = propensity_at(int(hist_t[r]))
        # A team starts a clean-up of the issues it cares about: on average 1.5 % of runs, more
        # often the higher the propensity, so the bursts carry the same signal as single fixes.
        h = np.where(rng.random(k) < 0.03 * _sigmoid(now), 1.0, h)
        p_drop = 0.0 if never_fixed else _sigmoid(now - 4.5 + 5.0 * h) * (f > 0)
        drop = rng.random(k) < p_drop
        amount = 1 + rng.binomial(np.maximum(f - 1, 0), rng.beta(2.0, 3.0, k))
        grow = rng.random(k) < 0.12
        f = np.where(drop, f - np.minimum(amount, f), f + grow * (1 + rng.poisson(1.0, k)))
        h = np.where(drop, np.maximum(h, 0.9), h)
        freq[r], heat[r] = f, h

    # --- branches: each has one or more base_oids, one after the other in time ------------------
    bases_per_branch = 1 + rng.multinomial(
        shape.bases - shape.branches, [1 / shape.branches] * shape.branches
    )
    segments: list[tuple[str, str, int, int]] = []  # branch, base_oid, start, end
    for b, n_bases in enumerate(bases_per_branch.tolist()):
        # Branches tile the history, overlapping a little: branch work goes on all the time, so
        # no month is without daily events (which would tie the month to the label).
        slot = (end - start) // shape.branches
        length = int(slot * rng.uniform(1.0, 1.5))
        b_start = start + b * slot - int(rng.integers(0, slot // 4 + 1))
        b_start = max(start, min(b_start, end - length))
        cuts = np.linspace(b_start, b_start + length, n_bases + 1).astype(np.int64)
        for j in range(n_bases):
            segments.append(
                (f"feature-{b + 1}", rng.bytes(20).hex(), int(cuts[j]), int(cuts[j + 1]))
            )
    n_daily_runs = math.ceil(shape.analysis / k)
    share = rng.dirichlet(np.full(len(segments), 2.0))
    runs_per_seg = 2 + rng.multinomial(n_daily_runs - 2 * len(segments), share)

    analysis: list[dict[str, Any]] = []
    run_id = 0
    for (branch, oid, s_start, s_end), m in zip(segments, runs_per_seg.tolist(), strict=True):
        t = _times(rng, s_start, s_end, m)
        at = max(int(np.searchsorted(hist_t, t[0], side="right")) - 1, 0)
        h0 = heat[at] * np.exp(-(t[0] - hist_t[at]) / _US_PER_DAY / _HEAT_DAYS)
        f0 = freq[at] + rng.poisson(0.5, k)
        q = _sigmoid(propensity_at(int(t[0])) - 2.8 + 5.0 * h0 + 0.3 * np.log1p(f0))
        fixes = (rng.random(k) < q) & (f0 > 0) & (not never_fixed)
        fix_at = rng.integers(1, m, k)
        seq = np.empty((m, k), dtype=np.int64)
        cur = f0.copy()
        for i in range(m):
            if i:
                cur = cur + (rng.random(k) < 0.1)
                dropped = 1 + rng.binomial(np.maximum(cur - 1, 0), 0.35)
                cur = np.where(fixes & (fix_at == i), cur - np.minimum(dropped, cur), cur)
            seq[i] = cur
        resolved = np.maximum(np.r_[seq[:1] * 0, seq[:-1] - seq[1:]], 0)
        # A few runs carry no base_oid (never a segment's first): segmentation drops them.
        null = rng.random(m) < 0.05
        null[0] = False
        for i in range(m):
            run_id += 1
            commit = rng.bytes(20).hex()
            base = None if null[i] else oid
            created = _iso(int(t[i]))
            analysis.extend(
                {
                    "repository_id": REPO_ID,
                    "run_id": run_id,
                    "branch_name": branch,
                    "base_oid": base,
                    "commit_oid": commit,
                    "check_id": run_id * 10 + 1,
                    "created_at": created,
                    "shortcode": codes[c],
                    "frequency_detected": int(seq[i, c]),
                    "frequency_resolved": int(resolved[i, c]),
                    "issue_type": _TYPES[type_i[c]][0],
                    "severity": _SEVERITIES[sev_i[c]][0],
                }
                for c in range(k)
            )
    analysis.sort(key=lambda row: row["created_at"])

    historical: list[dict[str, Any]] = []
    for r in range(n_hist_runs):
        base = rng.bytes(20).hex()
        stamp = _iso(int(hist_t[r]))
        historical.extend(
            {
                "run_id": 100_000 + r,
                "base_oid": base,
                "timestamp": stamp,
                "shortcode": codes[c],
                "frequency": int(freq[r, c]),
                "issue_type": _TYPES[type_i[c]][0],
                "severity": _SEVERITIES[sev_i[c]][0],
            }
            for c in range(k)
        )
    payload = {
        "repo_id": REPO_ID,
        "default_branch_name": "master",
        "analysis_run": analysis[: shape.analysis],
        "historical_run": historical[: shape.historical],
    }
    truth = dict(zip(codes, propensity_at(end).round(6).tolist(), strict=True))
    return payload, truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployflag.synthetic", description="Write a synthetic training request."
    )
    parser.add_argument("--size", choices=list(_SHAPES), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--never-fixed", action="store_true", help="no frequency ever drops")
    parser.add_argument("--drift", action="store_true", help="propensities move over the time span")
    parser.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    parser.add_argument(
        "--truth", type=Path, help="also write each shortcode's true propensity here (JSON)"
    )
    args = parser.parse_args(argv)
    payload, truth = generate_with_truth(
        args.size, seed=args.seed, never_fixed=args.never_fixed, drift=args.drift
    )
    if args.truth is not None:
        args.truth.write_bytes(orjson.dumps(truth, option=orjson.OPT_INDENT_2) + b"\n")
    body = orjson.dumps(payload)
    if args.output is None:
        sys.stdout.buffer.write(body + b"\n")
    else:
        args.output.write_bytes(body + b"\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
