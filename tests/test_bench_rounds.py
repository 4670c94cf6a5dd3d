"""bench/run.py --rounds: each setup keeps its run of median RPS, with every run's errors."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from common import Load, StreamLoad
from run import Taken, median_round


def taken(rps: float, non_2xx: int = 0, socket: int = 0, peak: int | None = 100,
          bad: int | None = None) -> Taken:
    load = Load(int(rps * 5), 5.0, rps, 1.0, 2.0, 3.0, 4.0, non_2xx, socket)
    first = None if bad is None else StreamLoad(10, 2.0, 5.0, 1.0, 2.0, 3.0, 4.0, bad, socket)
    return Taken(load, None, first, peak)


def test_the_run_of_median_rps_is_kept_with_the_errors_and_the_peak_of_every_run() -> None:
    kept = median_round([taken(300, peak=120), taken(100, non_2xx=2, peak=90),
                         taken(200, socket=1, peak=150)])
    assert kept.load.rps == 200
    assert (kept.load.non_2xx, kept.load.socket_errors) == (2, 1)
    assert kept.peak == 150


def test_of_an_even_count_the_lower_middle_run_is_kept() -> None:
    assert median_round([taken(400), taken(100), taken(300), taken(200)]).load.rps == 200
    assert median_round([taken(7)]).load.rps == 7


def test_the_streams_errors_of_every_run_are_kept() -> None:
    kept = median_round([taken(100, bad=1), taken(200, bad=0, socket=2), taken(300, bad=3)])
    assert kept.first is not None
    assert kept.first.rps == 5.0 and kept.load.rps == 200
    assert (kept.first.bad_answers, kept.first.socket_errors) == (4, 2)
    assert median_round([taken(100, peak=None)]).peak is None
