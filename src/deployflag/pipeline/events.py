"""The request's rows as numpy columns and the branch-run segmentation (both scorings), and the
seed scoring's fix-rate events: one per drop or per daily segment (docs/scoring.md).

Rows are grouped once (a stable sort by shortcode, then by time) and everything after that is
vectorised; the only per-item Python work is ``round(x, 4)`` on the events' fix rates, because
numpy's rounding is not Python's and the result must match ``round`` to the digit.

Most requests are small, where the cost is numpy's per-call overhead rather than the data: so
the helpers below build shifted and boundary arrays with plain slicing (``np.r_`` and
``np.insert`` cost several times more per call).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from numpy.typing import NDArray

from deployflag.messages import TrainingRequest

I64 = NDArray[np.int64]
F64 = NDArray[np.float64]
Bool = NDArray[np.bool_]

DAY_US = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
NULL = -1  # the code of a null base_oid


def micros(ts: datetime) -> int:
    """Microseconds since the epoch, exactly (``datetime.timestamp()`` is a float)."""
    return (ts - _EPOCH) // _MICROSECOND


def encode(values: Iterable[Hashable]) -> tuple[I64, list[Hashable]]:
    """Integer codes in order of first appearance, and the distinct values in that order."""
    index: dict[Hashable, int] = {}
    codes = [index.setdefault(v, len(index)) for v in values]
    return np.asarray(codes, dtype=np.int64), list(index)


def stable_order(*keys: NDArray[np.generic]) -> NDArray[np.intp]:
    """Indices that sort by ``keys[0]``, then ``keys[1]``, …; full ties keep their input order."""
    order = np.arange(len(keys[0]), dtype=np.intp)
    for key in reversed(keys):
        order = order[np.argsort(key[order], kind="stable")]
    return order


def group_starts(code: I64) -> NDArray[np.intp]:
    """First index of each run of equal values in a grouped array."""
    return np.flatnonzero(run_starts(code))


def run_starts(code: NDArray[np.generic]) -> Bool:
    """Whether each item starts a run of equal values (the first always does)."""
    first = np.empty(len(code), dtype=np.bool_)
    first[:1] = True
    np.not_equal(code[1:], code[:-1], out=first[1:])
    return first


def group_stops(starts: NDArray[np.intp], n: int) -> NDArray[np.intp]:
    """One past the last index of each group, given the groups' ``starts`` in ``n`` items."""
    stops = np.empty(len(starts), dtype=np.intp)
    stops[:-1] = starts[1:]
    stops[-1:] = n
    return stops


def shifted(values: NDArray[np.generic], fill: int | float | bool) -> NDArray[Any]:
    """``values`` moved one place later, ``fill`` first: item i is values[i - 1]."""
    out = np.empty(len(values), dtype=values.dtype)
    out[:1] = fill
    out[1:] = values[:-1]
    return out


def sources(n_historical: int, n_daily: int) -> Bool:
    """The ``daily`` flags of historical events followed by daily ones."""
    out = np.ones(n_historical + n_daily, dtype=np.bool_)
    out[:n_historical] = False
    return out


def round4_ratios(numerator: I64, denominator: I64) -> F64:
    """``round(a / b, 4)`` with Python's exact int division and rounding, item by item."""
    return np.asarray(
        [round(a / b, 4) for a, b in zip(numerator.tolist(), denominator.tolist(), strict=True)],
        dtype=np.float64,
    )


@dataclass(frozen=True, slots=True)
class Columns:
    """The rows the computation reads, as arrays; shortcode ``i`` is ``shortcodes[i]`` (sorted)."""

    shortcodes: tuple[str, ...]
    daily_code: I64
    daily_time: I64
    daily_freq: I64
    daily_branch: I64
    daily_base: I64  # NULL for a null base_oid
    hist_code: I64
    hist_time: I64
    hist_freq: I64


def columns(request: TrainingRequest) -> Columns:
    daily, hist = request.analysis_run, request.historical_run
    first_seen, names = encode([r["shortcode"] for r in daily] + [r["shortcode"] for r in hist])
    # Codes in sorted shortcode order: the evaluation order ties on shortcode.
    rank = np.empty(len(names), dtype=np.int64)
    rank[sorted(range(len(names)), key=lambda i: str(names[i]))] = np.arange(len(names))
    code = rank[first_seen] if len(first_seen) else first_seen
    bases = [r["base_oid"] for r in daily]
    base, _ = encode(bases)
    # A null base_oid counts as a value of its own; give it the code NULL.
    null = np.asarray([b is None for b in bases], dtype=np.bool_)
    return Columns(
        shortcodes=tuple(sorted(str(n) for n in names)),
        daily_code=code[: len(daily)],
        daily_time=np.asarray([micros(r["created_at"]) for r in daily], dtype=np.int64),
        daily_freq=np.asarray([r["frequency_detected"] for r in daily], dtype=np.int64),
        daily_branch=encode([r["branch_name"] for r in daily])[0],
        daily_base=np.where(null, NULL, base),
        hist_code=code[len(daily) :],
        hist_time=np.asarray([micros(r["timestamp"]) for r in hist], dtype=np.int64),
        hist_freq=np.asarray([r["frequency"] for r in hist], dtype=np.int64),
    )


@dataclass(frozen=True, slots=True)
class Events:
    """One row per event, grouped by shortcode code in the order the seed rule lists them: a
    shortcode's historical events in time order, then its daily events in segment order.

    The row index is therefore the "event order" that later stable sorts fall back on.
    """

    code: I64
    time: I64
    frequency_detected: I64
    fix_rate: F64
    daily: Bool

    def __len__(self) -> int:
        return len(self.code)


def _empty() -> tuple[I64, I64, I64, F64]:
    z = np.zeros(0, dtype=np.int64)
    return z, z, z, np.zeros(0, dtype=np.float64)


def historical(code: I64, time: I64, freq: I64) -> tuple[I64, I64, I64, F64]:
    """Events of the default branch: (code, time, frequency_detected, fix_rate), listed order."""
    if len(code) == 0:
        return _empty()
    o = stable_order(code, time)
    c, t, f = code[o], time[o], freq[o]
    starts = group_starts(c)
    ends = group_stops(starts, len(c)) - 1
    flat = np.maximum.reduceat(f, starts) == np.minimum.reduceat(f, starts)
    # A drop is a pair (i, i+1) inside one shortcode with a falling frequency; a flat shortcode
    # has none, so its one event (at its last row) never collides with a drop event.
    pair = np.flatnonzero((c[1:] == c[:-1]) & (f[1:] < f[:-1]))
    rate = round4_ratios(f[pair] - f[pair + 1], f[pair])
    anchor = np.concatenate([pair + 1, ends[flat]])
    detected = np.concatenate([f[pair], f[ends[flat]]])
    rates = np.concatenate([rate, np.zeros(int(flat.sum()))])
    k = np.argsort(anchor, kind="stable")  # back to (shortcode, time) order
    return c[anchor[k]], t[anchor[k]], detected[k], rates[k]


@dataclass(frozen=True, slots=True)
class Segments:
    """Daily rows in segment order: rows of one segment are contiguous and in time order.

    ``starts`` indexes the first row of each segment. Both scorings read branch runs through
    this one segmentation.
    """

    code: I64
    time: I64
    freq: I64
    starts: NDArray[np.intp]

    @property
    def ends(self) -> NDArray[np.intp]:
        """Last row of each segment."""
        return group_stops(self.starts, len(self.code)) - 1


def segments(code: I64, time: I64, freq: I64, branch: I64, base: I64) -> Segments:
    """Split branch runs into segments: per shortcode (rows by time), per branch in order of
    first appearance; a branch with one distinct base_oid (null counts) is one segment, else
    each non-null base_oid in order of first appearance is one and null rows are dropped."""
    if len(code) == 0:
        z = np.zeros(0, dtype=np.int64)
        return Segments(z, z, z, np.zeros(0, dtype=np.intp))
    o = stable_order(code, time)
    c, t, f, b, k = code[o], time[o], freq[o], branch[o], base[o]
    # Branches and base_oids go "in order of first appearance" among the time-sorted rows of
    # their shortcode; the position of that first appearance is the sort key that encodes it.
    _, first_b, inv_b = np.unique(
        c * (int(b.max()) + 1) + b, return_index=True, return_inverse=True
    )
    cb = inv_b.reshape(-1)  # one id per (shortcode, branch), < n, so the next key cannot overflow
    _, first_k, inv_k = np.unique(
        cb * (int(k.max()) + 2) + (k + 1), return_index=True, return_inverse=True
    )
    branch_first = first_b[cb]
    base_first = first_k[inv_k.reshape(-1)]
    values_per_branch = np.bincount(cb[first_k], minlength=len(first_b))
    multi = values_per_branch[cb] > 1
    keep = np.flatnonzero(~(multi & (k == NULL)))
    # Segments: by shortcode and branch order (branch_first), then base order (base_first); the
    # row position inside keeps time order. A single-value branch has one base_first.
    s = keep[np.lexsort((keep, base_first[keep], branch_first[keep]))]
    return Segments(code=c[s], time=t[s], freq=f[s], starts=group_starts(base_first[s]))


def daily_segments(cols: Columns) -> Segments:
    """The segments of the request's branch runs (both scorings read them)."""
    return segments(
        cols.daily_code, cols.daily_time, cols.daily_freq, cols.daily_branch, cols.daily_base
    )


def daily(seg: Segments) -> tuple[I64, I64, I64, F64]:
    """Events of branch runs, one per segment: (code, time, frequency_detected, fix_rate)."""
    if len(seg.code) == 0:
        return _empty()
    starts, fs = seg.starts, seg.freq
    step = np.zeros(len(fs), dtype=np.int64)
    step[1:] = np.diff(fs)
    step[starts] = 0  # no step across a segment boundary
    detected = fs[starts] + np.add.reduceat(np.maximum(step, 0), starts)
    resolved = np.add.reduceat(np.maximum(-step, 0), starts)
    flat = np.maximum.reduceat(fs, starts) == np.minimum.reduceat(fs, starts)
    rate = np.zeros(len(starts), dtype=np.float64)
    moved = np.flatnonzero(~flat)
    rate[moved] = round4_ratios(resolved[moved], detected[moved])
    # For a flat segment ``detected`` is f0, as the seed rule asks.
    return seg.code[starts], seg.time[seg.ends], detected, rate


def build(cols: Columns, seg: Segments | None = None) -> Events:
    """``seg``: the request's :func:`daily_segments`, when already computed."""
    hc, ht, hf, hr = historical(cols.hist_code, cols.hist_time, cols.hist_freq)
    dc, dt, df, dr = daily(daily_segments(cols) if seg is None else seg)
    # Historical first, then daily, per shortcode: a stable sort by code of the concatenation.
    code = np.concatenate([hc, dc])
    o = np.argsort(code, kind="stable")
    is_daily = sources(len(hc), len(dc))
    return Events(
        code=code[o],
        time=np.concatenate([ht, dt])[o],
        frequency_detected=np.concatenate([hf, df])[o],
        fix_rate=np.concatenate([hr, dr])[o],
        daily=is_daily[o],
    )
