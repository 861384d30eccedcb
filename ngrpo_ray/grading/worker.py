"""The body of a grading worker process. It grades in its main thread, so math-verify's signal.alarm timeouts work;
the parent still enforces a hard wall-clock limit by killing the process (some inputs ignore the alarm)."""
from __future__ import annotations

import os
from multiprocessing.connection import Connection

from ngrpo_ray.grading.job import GradeJob, run_job
from ngrpo_ray.grading.result import GradeResult

READY = "ready"


def worker_main(conn: Connection, inner_timeout_s: int | None) -> None:
    import logging
    import signal

    # Ctrl-C goes to the whole process group; the parent handles it and closes the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    import math_verify  # noqa: F401 - import before announcing readiness so start-up never counts against a job

    # math-verify logs a warning per timeout; the pool counts them instead.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # Warm the parser and sympy so the first job does not pay for lazy imports.
    run_job(GradeJob("\\boxed{\\frac{1}{2}}", "0.5"), inner_timeout_s)
    conn.send((READY, os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # parent went away
        if message is None:
            return
        job_index, job = message
        try:
            result = run_job(job, inner_timeout_s)
        except BaseException as exc:  # noqa: BLE001 - report every failure to the parent, where it is counted
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            result = GradeResult(False, "error", None, f"{type(exc).__name__}: {str(exc)[:200]}")
        conn.send((job_index, result))
