"""GradingPool: hard limits enforced from outside, dead workers replaced, input order kept, exact counters.
Limits are 2-3 s so the whole file stays well under 30 s."""
import os
import signal
import threading
import time

import pytest

from ngrpo_ray.grading import GradeJob, GradingPool

HANG = r"\boxed{5^{5^{5^{5}}}}"


def _gone(pid: int) -> bool:
    """True once the process is reaped (a zombie still has a /proc entry)."""
    return not os.path.exists(f"/proc/{pid}")


def test_hang_is_killed_at_the_limit_and_the_next_answers_still_grade():
    # inner_timeout_s far above the hard limit: only the parent's kill can end the power tower in time.
    with GradingPool(num_workers=1, timeout_s=2.0, inner_timeout_s=60).wait_ready() as pool:
        start = time.monotonic()
        (hang,) = pool.grade_math([HANG], ["5"])
        elapsed = time.monotonic() - start
        assert (hang.status, hang.correct, hang.extracted) == ("timeout", False, "5^{5^{5^{5}}}")
        assert 2.0 <= elapsed < 2.0 + 1.5, elapsed  # the limit plus a small overhead, not the 60 s alarm
        texts = [r"\boxed{5}", r"\boxed{\dfrac12}", "no box", r"\boxed{4 = 5}"]
        results = pool.grade_math(texts, ["5", "1/2", "5", "5"])
        assert [(r.status, r.correct) for r in results] == [
            ("ok", True), ("ok", True), ("no_answer", False), ("relation", False)]
        assert pool.counters() == {
            "graded": 5, "correct": 2, "no_answer": 1, "parse_error": 0, "timeout": 1, "error": 0, "relation": 1,
            "worker_restarts": 1,
        }


def test_math_verify_alarm_handles_the_hang_without_a_restart_and_works_from_a_thread():
    # Default inner timeout (1 s here): the worker's main-thread alarm fires first. The caller is NOT a main thread,
    # which is how a Ray actor calls it; in-thread math-verify would raise there.
    out = {}
    with GradingPool(num_workers=1, timeout_s=3.0) as pool:
        thread = threading.Thread(target=lambda: out.update(r=pool.grade_math([HANG, r"\boxed{0.5}"], ["5", "1/2"])))
        thread.start()
        thread.join(30)
        assert [(r.status, r.correct) for r in out["r"]] == [("timeout", False), ("ok", True)]
        assert pool.counters()["worker_restarts"] == 0


def _kill_when_busy_with(pool: GradingPool, job_index: int) -> threading.Thread:
    def kill() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for pid, index in pool.busy_workers().items():
                if index == job_index:
                    time.sleep(0.2)
                    os.kill(pid, signal.SIGKILL)
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_killed_worker_is_replaced_and_its_job_reported_as_error_without_retries():
    preds = [HANG] + [rf"\boxed{{{i}}}" for i in range(1, 9)]
    golds = ["5"] + [str(i) for i in range(1, 9)]
    with GradingPool(num_workers=2, timeout_s=20.0, inner_timeout_s=60, retries_after_crash=0) as pool:
        pool.wait_ready()
        pids_before = set(pool.worker_pids())
        killer = _kill_when_busy_with(pool, 0)
        start = time.monotonic()
        results = pool.grade_math(preds, golds)
        killer.join()
        assert time.monotonic() - start < 10.0  # the kill, not the 20 s limit, ended job 0
        assert (results[0].status, results[0].correct) == ("error", False)
        assert "died" in results[0].detail
        assert [r.extracted for r in results[1:]] == [str(i) for i in range(1, 9)]
        assert all(r.correct for r in results[1:])
        assert pool.counters() == {
            "graded": 9, "correct": 8, "no_answer": 0, "parse_error": 0, "timeout": 0, "error": 1, "relation": 0,
            "worker_restarts": 1
        }
        assert len(pids_before - set(pool.worker_pids())) == 1
        # the pool still grades after the crash
        assert pool.grade_math([r"\boxed{3}"], ["3"])[0].correct


def test_killed_job_is_retried_once_on_a_fresh_worker():
    with GradingPool(num_workers=2, timeout_s=2.0, inner_timeout_s=60, retries_after_crash=1) as pool:
        pool.wait_ready()
        killer = _kill_when_busy_with(pool, 0)
        results = pool.grade_math([HANG, r"\boxed{1}", r"\boxed{2}"], ["5", "1", "2"])
        killer.join()
        # the retry of the hang then runs into the hard limit
        assert [r.status for r in results] == ["timeout", "ok", "ok"]
        assert pool.counters()["worker_restarts"] == 2  # the kill and the timeout
        assert pool.counters()["timeout"] == 1 and pool.counters()["error"] == 0


def test_order_is_preserved_mixed_kinds_and_counters_accumulate_then_no_zombies():
    n = 24
    jobs = []
    expected = []
    for i in range(n):
        if i % 3 == 0:
            jobs.append(GradeJob(f"Answer: {'ABCD'[i % 4]}", "ABCD"[(i // 3) % 4], kind="gpqa"))
            expected.append(("ABCD"[i % 4], "ABCD"[i % 4] == "ABCD"[(i // 3) % 4]))
        else:
            gold = str(i) if i % 2 == 0 else str(i + 1)
            jobs.append(GradeJob(rf"work \boxed{{{i}}}", gold))
            expected.append((str(i), i % 2 == 0))
    with GradingPool(num_workers=2, timeout_s=3.0) as pool:
        first = pool.grade(jobs)
        assert [(r.extracted, r.correct) for r in first] == expected
        second = pool.grade(list(reversed(jobs)))
        assert [(r.extracted, r.correct) for r in second] == list(reversed(expected))
        n_correct = sum(c for _, c in expected)
        counts = pool.counters()
        assert counts["graded"] == 2 * n and counts["correct"] == 2 * n_correct and counts["worker_restarts"] == 0
        assert pool.grade([]) == []
        pids = pool.worker_pids()
    assert all(_gone(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.grade(jobs)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_workers"):
        GradingPool(num_workers=0)
    with pytest.raises(ValueError, match="mode"):
        GradeJob(r"\boxed{1}", "1", mode="exact")


class _Interrupted(Exception):
    pass


def test_an_interrupted_call_leaks_no_stale_results_into_the_next():
    def interrupt(signum, frame):
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with GradingPool(num_workers=1, timeout_s=2.0, inner_timeout_s=60).wait_ready() as pool:
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            with pytest.raises(_Interrupted):
                pool.grade_math([HANG, r"\boxed{9}"], ["5", "9"])  # interrupted while the hang is in flight
            # the stale hang keeps the only worker busy until its own deadline; it must not answer this call
            results = pool.grade_math([r"\boxed{1}", r"\boxed{2}"], ["1", "3"])
            assert [(r.extracted, r.correct) for r in results] == [("1", True), ("2", False)]
            assert pool.counters() == {
                "graded": 2, "correct": 1, "no_answer": 0, "parse_error": 0, "timeout": 0, "error": 0, "relation": 0,
                "worker_restarts": 1,
            }
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
