"""The one schedule every method uses: when masks change, when the schedule ends, how far
along it is, and points given as fractions of the run."""

import math

import pytest

from topkast_cli.errors import UserError
from topkast_cli.sparsity import GMP, SET, MaskSchedule, RigL, TopKAST

STEPS = range(1, 61)


def changes(schedule, steps=STEPS):
    return [t for t in steps if schedule.updates_at(t)]


def test_every_step_count_from_begin_up_to_end():
    assert changes(MaskSchedule(10)) == [10, 20, 30, 40, 50, 60]
    assert changes(MaskSchedule(10, end=35)) == [10, 20, 30]
    assert changes(MaskSchedule(10, end=35, update_at_end=True)) == [10, 20, 30, 35]
    assert changes(MaskSchedule(10, end=30)) == [10, 20, 30], "an end on the period is an update"
    assert changes(MaskSchedule(10, begin=5, end=32, update_at_end=True)) == [15, 25, 32]
    assert changes(MaskSchedule(10, begin=5, end=35, update_at_end=True)) == [15, 25, 35]
    assert changes(MaskSchedule(10, end=0)) == [] and changes(MaskSchedule(10, end=0, update_at_end=True)) == []


def test_ended_and_progress():
    s = MaskSchedule(10, begin=20, end=60)
    assert [s.ended(t) for t in (0, 59, 60, 61)] == [False, False, True, True]
    assert not MaskSchedule(10).ended(10**9), "no end: never over"
    assert [s.progress(t) for t in (0, 20, 30, 40, 60, 100)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    assert MaskSchedule(1, begin=0, end=0).progress(0) == 1.0
    with pytest.raises(ValueError):
        MaskSchedule(10).progress(5)


def test_fractions_resolve_against_the_run_length():
    s = MaskSchedule(10, begin=0.1, end=0.75)
    assert (s.begin, s.end, s.resolved) == (None, None, False)
    assert s.resolve(300) is s and (s.begin, s.end, s.resolved) == (30, 225, True)
    assert (s.begin_at, s.end_at) == (0.1, 0.75), "the points as given stay (a resume may resolve again)"
    assert s.resolve(200).end == 150
    assert MaskSchedule(10, end=None).resolved


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every": 0}, "every"),
        ({"every": 2.5}, "every"),
        ({"every": 1, "end": -1}, "end"),
        ({"every": 1, "end": 1.5}, "end"),
        ({"every": 1, "begin": 50, "end": 10}, "after"),
        ({"every": 1, "begin": 0.8, "end": 0.5}, "after"),
    ],
)
def test_bad_schedules(kwargs, match):
    with pytest.raises(UserError, match=match):
        MaskSchedule(**kwargs)


def test_a_window_that_resolves_backwards_is_an_error():
    with pytest.raises(UserError, match="after"):
        MaskSchedule(1, begin=100, end=0.5).resolve(100)


# ---------------------------------------- the methods' rules, as they were written before
def old_topkast_changes(every, end, steps=STEPS):
    locked, out = end == 0, []
    for t in steps:
        if locked:
            continue
        if end is not None and t >= end:
            locked = True
        elif t % every != 0:
            continue
        out.append(t)
    return out


def old_dynamic_due(t, every, end):
    return not (end is not None and t > end) and t % every == 0


def old_gmp_due(t, every, begin, end):
    return begin < t <= end and ((t - begin) % every == 0 or t == end)


@pytest.mark.parametrize("every", [1, 3, 10])
@pytest.mark.parametrize("end", [None, 0, 1, 9, 30, 31])
def test_methods_keep_their_rules(every, end):
    topkast = TopKAST(0.9, 0.8, refresh_interval=every, exploration_steps=end)
    locked, got = topkast.locked, []
    for t in STEPS:  # the lock as TopKAST.after_step applies it
        if locked:
            continue
        if topkast.schedule.ended(t):
            locked = True
        elif not topkast.schedule.updates_at(t):
            continue
        got.append(t)
    assert got == old_topkast_changes(every, end)
    for method in (SET(0.9, update_interval=every, end_steps=end), RigL(0.9, update_interval=every, end_steps=end)):
        method.layers = [object()]  # only the schedule is read
        assert [t for t in STEPS if method.update_due(t)] == [t for t in STEPS if old_dynamic_due(t, every, end)]
    if end is not None:
        for begin in (0, 1, 4, end):
            gmp = GMP(0.9, begin_steps=begin, end_steps=end, prune_interval=every) if begin <= end else None
            if gmp is not None:
                assert changes(gmp.schedule) == [t for t in STEPS if old_gmp_due(t, every, begin, end)]


def test_rigl_cosine_and_gmp_cubic_follow_progress():
    rigl = RigL(0.9, update_interval=10, drop_fraction=0.4, end_steps=0.75)
    rigl.resolve_schedule(400)
    for t in (0, 10, 150, 299, 300, 310):
        assert rigl.fraction(t) == 0.4 / 2 * (1 + math.cos(math.pi * min(t, 300) / 300))
    assert RigL(0.9, drop_fraction=0.4, end_steps=None).fraction(50) == 0.4, "no end: constant"
    gmp = GMP(0.9, begin_steps=10, end_steps=70)

    class Layer:
        numel, k_forward = 1000, 100

    for t in (0, 10, 11, 40, 69):
        left = 1.0 - (t - 10) / 60 if t > 10 else 1.0
        assert gmp.count(Layer, t) == 100 + round(900 * left**3)
    assert gmp.count(Layer, 70) == gmp.count(Layer, 500) == 100
