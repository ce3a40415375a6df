"""Forecast scoring's events: one per consecutive pair of counts, so a flat or rising count is a
"not fixed" event as honestly as a drop is a "fixed" one.

The seed scoring only makes a historical event where a count drops, so all of them are labelled
"fixed" and a model learns the event's source instead of the team's habits. Here every pair
(i, i+1) of a shortcode's default-branch rows with f(i) > 0 is an event, and so is every pair of
consecutive rows inside a branch segment (the seed's segmentation):

    time = row i+1's, frequency = f(i), fix rate r = round(max(0, f(i) - f(i+1)) / f(i), 4)

A shortcode's events are ordered by time, historical before daily on ties. See docs/scoring.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deployflag.pipeline.events import (
    F64,
    I64,
    Bool,
    Columns,
    Segments,
    daily_segments,
    round4_ratios,
    run_starts,
    shifted,
    sources,
    stable_order,
)


@dataclass(frozen=True, slots=True)
class PairEvents:
    """Events grouped by shortcode code; inside a code by time, historical before daily."""

    code: I64
    time: I64
    frequency: I64  # f(i): the count before the pair's second row
    fix_rate: F64
    daily: Bool

    def __len__(self) -> int:
        return len(self.code)

    @property
    def label(self) -> I64:
        return (self.fix_rate > 0).astype(np.int64)


def _pairs(code: I64, time: I64, freq: I64, first: Bool) -> tuple[I64, I64, I64, F64]:
    """Events of consecutive rows ``(j-1, j)`` where row j does not start a group (``first``)
    and f(j-1) > 0; rows must already be grouped and time-ordered."""
    if len(code) == 0:
        return code, time, freq, np.zeros(0, dtype=np.float64)
    j = np.flatnonzero(~first & (shifted(freq, 0) > 0))
    before, after = freq[j - 1], freq[j]
    rate = round4_ratios(np.maximum(before - after, 0), before)
    return code[j], time[j], before, rate


def build(cols: Columns, seg: Segments | None = None) -> PairEvents:
    """``seg``: the request's daily segments (events.daily_segments), when already computed."""
    o = stable_order(cols.hist_code, cols.hist_time)
    hc, ht, hf = cols.hist_code[o], cols.hist_time[o], cols.hist_freq[o]
    hist = _pairs(hc, ht, hf, run_starts(hc))

    if seg is None:
        seg = daily_segments(cols)
    d_first = np.zeros(len(seg.code), dtype=np.bool_)
    d_first[seg.starts] = True
    day = _pairs(seg.code, seg.time, seg.freq, d_first)

    is_daily = sources(len(hist[0]), len(day[0]))
    code, time, freq, rate = (np.concatenate([a, b]) for a, b in zip(hist, day, strict=True))
    # By shortcode, then time, historical before daily; full ties keep segment order.
    k = np.lexsort((np.arange(len(code)), is_daily, time, code))
    return PairEvents(
        code=code[k], time=time[k], frequency=freq[k], fix_rate=rate[k], daily=is_daily[k]
    )
