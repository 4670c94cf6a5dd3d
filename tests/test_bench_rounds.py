"""bench/run.py --rounds: each setup keeps its run of median RPS, with every run's errors."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from common import Load, StreamLoad
from run import Taken, median_round, rounds_section


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


def test_the_rounds_section_gives_each_setups_paired_ratios() -> None:
    lines = rounds_section({
        ("bare pass-through", 64): [100.0, 200.0, 400.0],
        ("proxy, 1 worker", 64): [50.0, 120.0, 100.0],  # 0.5, 0.6, 0.25 of bare's
        ("previous release, 1 worker", 64): [25.0, 100.0, 50.0],  # 2.0, 1.2, 2.0
        ("proxy, 1 worker, stream", 64): [10.0, 10.0, 10.0],  # no stream baseline ran
    })
    table = [line for line in "\n".join(lines).splitlines()
             if line.startswith("| ") and "---" not in line]
    rows = {cells[0]: cells for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in table)}
    assert rows["proxy, 1 worker"][2:] == ["50 · 120 · 100", "2.40x", "0.50x", "2.00x"]
    assert rows["previous release, 1 worker"][4:] == ["0.25x", ""]
    assert rows["bare pass-through"][4:] == ["", ""]
    assert rows["proxy, 1 worker, stream"][4:] == ["", ""]
