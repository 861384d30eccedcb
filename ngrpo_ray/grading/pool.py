"""GradingPool: grade many answers in killable worker processes with a hard wall-clock limit per answer.

Why processes and not threads: math-verify's timeouts need a main thread (in a Ray actor thread they raise, and
frameworks that swallowed that error turned every reward into 0), and some inputs (power towers such as
5^{5^{5^5}}) hang past the alarm. Each worker grades in its main thread; the parent measures every job from the
moment it was sent and kills (then replaces) a worker that runs past the limit. A worker that dies is replaced and
its job retried once. The pool never stalls: every answer comes back with a status, and every failure is counted.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Iterable, Sequence

from ngrpo_ray.grading.boxed import extract_last_boxed
from ngrpo_ray.grading.job import GradeJob
from ngrpo_ray.grading.result import GRADE_STATUSES, GradeResult
from ngrpo_ray.grading.worker import READY, worker_main


def _boxed_of(job: GradeJob) -> str | None:
    """What the answer was, for the record, when the worker could not say (pure string work, safe in the parent)."""
    return extract_last_boxed(job.pred_text) if job.kind == "math" and job.mode != "whole_response" else None


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    ready: bool = False
    job_index: int | None = None
    job_batch: int = -1  # which grade() call the job belongs to: results of an interrupted call are discarded
    job_started: float = 0.0
    spawned_at: float = field(default_factory=time.monotonic)


class GradingPool:
    """Usage:
        with GradingPool(num_workers=2, timeout_s=10) as pool:
            results = pool.grade_math(responses, golds)      # list[GradeResult], input order
            metrics.update(pool.counters())

    timeout_s: hard wall-clock limit per answer, enforced by killing the worker.
    inner_timeout_s: math-verify's own per-call alarm inside the worker (whole seconds); the default is a quarter of
        the hard limit so the common slow case ends cleanly without a process restart.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        inner_timeout_s: int | None = None,
        start_timeout_s: float = 120.0,
        retries_after_crash: int = 1,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"GradingPool num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"GradingPool timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.inner_timeout_s = inner_timeout_s if inner_timeout_s is not None else max(1, int(timeout_s // 4))
        self.start_timeout_s = start_timeout_s
        self.retries_after_crash = retries_after_crash
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._closed = False
        self._start_failures = 0
        self._lock = threading.Lock()  # one grade() at a time (a threaded Ray actor may call it concurrently)
        self._batch = 0
        self._counts = {"graded": 0, "correct": 0, "worker_restarts": 0}
        self._counts.update({status: 0 for status in GRADE_STATUSES if status != "ok"})
        for _ in range(num_workers):
            self._workers.append(self._spawn())

    # ---- public API -------------------------------------------------------------------------------------------
    def grade(self, jobs: Sequence[GradeJob]) -> list[GradeResult]:
        """Grade jobs; results in input order. Blocks until every job has a result."""
        with self._lock:
            if self._closed:
                raise RuntimeError("GradingPool is closed")
            return self._grade_locked(jobs)

    def _grade_locked(self, jobs: Sequence[GradeJob]) -> list[GradeResult]:
        self._batch += 1
        results: list[GradeResult | None] = [None] * len(jobs)
        pending: deque[int] = deque(range(len(jobs)))
        crashes = [0] * len(jobs)
        remaining = len(jobs)
        while remaining:
            self._dispatch(jobs, pending)
            self._wait_for_events()
            for index, result in self._collect(jobs, crashes, pending):
                results[index] = result
                remaining -= 1
                self._count(result)
        return [r for r in results if r is not None]

    def grade_math(
        self, pred_texts: Sequence[str], golds: Sequence[str], mode: str = "last_boxed"
    ) -> list[GradeResult]:
        if len(pred_texts) != len(golds):
            raise ValueError(f"grade_math got {len(pred_texts)} responses but {len(golds)} gold answers")
        return self.grade([GradeJob(p, str(g), "math", mode) for p, g in zip(pred_texts, golds)])

    def grade_gpqa(self, pred_texts: Sequence[str], gold_letters: Sequence[str]) -> list[GradeResult]:
        if len(pred_texts) != len(gold_letters):
            raise ValueError(f"grade_gpqa got {len(pred_texts)} responses but {len(gold_letters)} gold letters")
        return self.grade([GradeJob(p, str(g), "gpqa") for p, g in zip(pred_texts, gold_letters)])

    def wait_ready(self) -> "GradingPool":
        """Block until every worker has started (optional: grade() never charges start-up to a job's limit)."""
        with self._lock:
            self._batch += 1  # anything still in flight belongs to an interrupted call and is discarded
            while not all(w.ready for w in self._workers):
                self._wait_for_events()
                for _ in self._collect([], [], deque()):
                    pass
        return self

    def counters(self) -> dict[str, int]:
        """Cumulative counts since the pool started: graded, correct, no_answer, parse_error, timeout, error,
        relation (a boxed relation that is not an answer, grading.relation), worker_restarts."""
        return dict(self._counts)

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def busy_workers(self) -> dict[int, int]:
        """pid -> index (in the current grade() call) of the job that worker is grading."""
        return {w.process.pid: w.job_index for w in list(self._workers) if w.job_index is not None and w.process.pid}

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            self._stop(w)
        self._workers = []

    def __enter__(self) -> "GradingPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ---- internals --------------------------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_main, args=(child_conn, self.inner_timeout_s), name="ngrpo-grader", daemon=True
        )
        process.start()
        child_conn.close()  # the parent keeps only its end, so a dead child shows up as EOF
        return _Worker(process, parent_conn)

    @staticmethod
    def _stop(worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()  # reap: no zombies
        worker.conn.close()

    def _replace(self, worker: _Worker) -> None:
        self._stop(worker)
        self._workers[self._workers.index(worker)] = self._spawn()
        self._counts["worker_restarts"] += 1

    def _dispatch(self, jobs: Sequence[GradeJob], pending: deque[int]) -> None:
        for w in self._workers:
            if not pending:
                return
            if w.ready and w.job_index is None:
                index = pending.popleft()
                try:
                    w.conn.send(((self._batch, index), jobs[index]))
                except (OSError, BrokenPipeError):
                    pending.appendleft(index)  # died while idle; _collect replaces it
                    continue
                w.job_index, w.job_batch, w.job_started = index, self._batch, time.monotonic()

    def _next_deadline(self) -> float:
        deadlines = [w.job_started + self.timeout_s for w in self._workers if w.job_index is not None]
        deadlines += [w.spawned_at + self.start_timeout_s for w in self._workers if not w.ready]
        return min(deadlines) if deadlines else math.inf

    def _wait_for_events(self) -> None:
        handles: list[object] = [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers]
        timeout = max(0.0, self._next_deadline() - time.monotonic())
        wait(handles, timeout=None if math.isinf(timeout) else timeout)

    def _collect(
        self, jobs: Sequence[GradeJob], crashes: list[int], pending: deque[int]
    ) -> Iterable[tuple[int, GradeResult]]:
        now = time.monotonic()
        for w in list(self._workers):
            # Messages first: a worker may have sent its result and then died.
            died = False
            while not died and w.conn.poll():
                try:
                    message = w.conn.recv()
                except (EOFError, OSError):
                    died = True
                    break
                if message[0] == READY:
                    w.ready = True
                    self._start_failures = 0
                else:
                    (batch, index), result = message
                    w.job_index = None
                    if batch == self._batch:
                        yield index, result
            current = w.job_index is not None and w.job_batch == self._batch
            if died or not w.process.is_alive():
                if current:
                    index = w.job_index
                    crashes[index] += 1
                    if crashes[index] > self.retries_after_crash:
                        yield index, GradeResult(
                            False, "error", _boxed_of(jobs[index]), f"grading worker died {crashes[index]} times"
                        )
                    else:
                        pending.appendleft(index)  # not the answer's fault as far as we know: try again
                if not w.ready:
                    self._start_failures += 1
                    if self._start_failures >= 3:
                        w.process.join()
                        raise RuntimeError(
                            "grading workers keep dying before they are ready "
                            f"(last exit code {w.process.exitcode}); is math-verify importable in a fresh process?"
                        )
                self._replace(w)
            elif w.job_index is not None and now - w.job_started > self.timeout_s:
                index = w.job_index
                self._replace(w)
                if not current:
                    continue
                yield index, GradeResult(
                    False, "timeout", _boxed_of(jobs[index]), f"killed after the {self.timeout_s:g} s limit"
                )
            elif not w.ready and now - w.spawned_at > self.start_timeout_s:
                raise RuntimeError(
                    f"grading worker did not start within {self.start_timeout_s:g} s (is math-verify installed?)"
                )

    def _count(self, result: GradeResult) -> None:
        self._counts["graded"] += 1
        self._counts["correct"] += int(result.correct)
        if result.status != "ok":
            self._counts[result.status] += 1
