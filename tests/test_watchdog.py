"""Hang detection's decisions (checkpoint/watchdog.py); the SIGSTOP test in tests/test_slurm.py runs it."""

import os

from checkpoint.watchdog import MIN_TIMEOUT_S, HangWatch, hang_timeout


def test_the_hang_timeout_is_the_configured_one_or_five_median_steps_but_at_least_a_minute():
    assert hang_timeout([0.5, 0.4, 0.6], configured=7.0) == 7.0
    assert hang_timeout([], configured=None) == MIN_TIMEOUT_S
    assert hang_timeout([1.0, 2.0, 100.0], configured=None) == MIN_TIMEOUT_S  # 5 x 2 s < 60 s
    assert hang_timeout([30.0, 20.0, 25.0, 400.0], configured=None) == 5 * 27.5


def test_a_rank_is_overdue_once_it_reports_nothing_for_the_timeout_and_then_unwatched():
    watch, me = HangWatch(configured_s=10.0), os.getpid()
    watch.report(0, 1, me, leaving=False, now=100.0)
    watch.report(1, 1, me + 1, leaving=False, now=100.0)
    watch.report(0, 2, me, leaving=False, now=105.0)
    assert [h.rank for h in watch.overdue(now=110.5)] == [1]  # rank 0 reported at 105
    hung = watch.overdue(now=115.5)
    assert [(h.rank, h.step) for h in hung] == [(0, 2)] and hung[0].idle_s == 10.5
    assert watch.overdue(now=1000.0) == []  # each hang is reported once


def test_a_rank_that_leaves_or_restarts_is_watched_afresh():
    watch, me = HangWatch(configured_s=10.0), os.getpid()
    watch.report(0, 5, me, leaving=False, now=0.0)
    watch.report(0, 0, me, leaving=True, now=1.0)
    assert watch.overdue(now=100.0) == []  # it said it was ending
    watch.report(0, 5, me, leaving=False, now=200.0)
    watch.report(0, 6, me + 7, leaving=False, now=205.0)  # another process: a restarted rank
    assert watch.overdue(now=212.0) == [] and watch.ranks[0].pid == me + 7


def test_the_automatic_timeout_follows_the_ranks_own_steps():
    watch, me = HangWatch(configured_s=None), os.getpid()
    for step in range(1, 12):
        watch.report(0, step, me, leaving=False, now=30.0 * step)  # 30 s steps: 150 s timeout
    assert watch.overdue(now=330.0 + 149.0) == []
    assert [h.timeout_s for h in watch.overdue(now=330.0 + 151.0)] == [150.0]
