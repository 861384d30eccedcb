"""Progress lines of long commands: silent while short, then done/total, elapsed and an ETA from the mean unit time."""

import io

import torch

from ngrpo_ray.core.neighbors import build_neighbor_table
from ngrpo_ray.progress import Progress, format_seconds


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 42.4, 65, 3599, 3720)] == ["0s", "42s", "1m05s", "59m59s", "1h02m"]


def test_quiet_then_estimate_from_the_mean_unit_time():
    clock, out = FakeClock(), io.StringIO()
    p = Progress(10, "rows", quiet_s=3.0, every_s=10.0, stream=out, clock=clock)
    clock.t += 2.0
    p.update(1)  # 2 s in: still quiet
    assert out.getvalue() == ""
    clock.t += 2.0
    p.update(2)  # 4 s for 2 units -> 2 s each, 8 left -> 16 s
    assert out.getvalue() == "rows: 2/10, elapsed 4s, ETA 16s\n"
    clock.t += 5.0
    p.update(3)  # only 5 s since the last line: not printed
    assert out.getvalue().count("\n") == 1
    clock.t += 21.0
    p.update(10)  # finished: always printed once something was
    assert out.getvalue().splitlines()[-1] == "rows: 10/10, elapsed 30s, done"


def test_short_runs_stay_silent_and_setup_is_not_unit_time():
    clock, out = FakeClock(), io.StringIO()
    p = Progress(2, "quick", quiet_s=3.0, stream=out, clock=clock)
    clock.t += 1.0
    p.update(2)
    assert out.getvalue() == ""

    p = Progress(4, "rounds", quiet_s=0.0, every_s=0.0, stream=out, clock=clock)
    clock.t += 60.0  # engine builds
    p.note("engines built")
    p.begin_units()
    clock.t += 10.0
    p.update(1)  # 10 s per round, 3 left -> 30 s; elapsed counts the setup too
    assert out.getvalue().splitlines() == ["rounds: engines built (elapsed 1m00s)",
                                           "rounds: 1/4, elapsed 1m10s, ETA 30s"]


def test_neighbor_table_reports_each_chunk():
    calls = []
    table = build_neighbor_table(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), 3, chunk_rows=4,
                                 on_chunk=lambda done, total: calls.append((done, total)))
    assert table.shape == (10, 3)
    assert calls == [(4, 10), (8, 10), (10, 10)]
