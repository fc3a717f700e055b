"""One worker, a bounded waiting line, and jobs that can be followed and cancelled.

The CPU runs one generation at a time, so every request (API or UI) becomes a `Job` that waits
behind a single worker thread. At most `max_waiting` jobs wait; past that `submit` raises
`QueueFull` with a Retry-After estimate (the mean time of recent jobs times the line ahead). A
job that is cancelled (its client went away) or outlives its deadline leaves the line at once;
while it runs, the work function calls `job.check()` between steps, which stops it there.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from pixsigma.errors import PixsigmaError

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED, TIMED_OUT = "queued", "running", "done", "failed", "cancelled", "timed_out"
FINAL = (DONE, FAILED, CANCELLED, TIMED_OUT)


class QueueFull(Exception):
    """The waiting line is full; retry after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy ({waiting} requests waiting, the most it queues); retry in {retry_after} s")
        self.retry_after = retry_after


class Stopped(Exception):
    """Raised inside a running job by `Job.check` once it is cancelled or past its deadline."""


@dataclass
class Progress:
    """Where a running job is: image `image` (from 0) of `images`, step `step` (from 1) of `steps`."""

    image: int = 0
    images: int = 1
    step: int = 0
    steps: int = 1

    @property
    def fraction(self) -> float:
        return min(1.0, (self.image + self.step / max(1, self.steps)) / max(1, self.images))


class Job:
    """One request's generation: its input, state, progress, and result or error."""

    def __init__(self, request, timeout_s: float):
        self.id = uuid.uuid4().hex
        self.request = request
        self.created = time.monotonic()
        self.deadline = self.created + timeout_s
        self.state = QUEUED
        self.progress = Progress()
        self.result = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def check(self) -> None:
        """Stop here (raise `Stopped`) when cancelled or past the deadline; called between steps."""
        if self._stop.is_set() or time.monotonic() > self.deadline:
            raise Stopped()

    def _finish(self, state: str, result=None, error: BaseException | None = None) -> None:
        self.state, self.result, self.error = state, result, error
        self._done.set()


class JobQueue:
    """A bounded line of jobs in front of one worker thread that runs `work(job)` for each."""

    def __init__(self, work: Callable[[Job], object], max_waiting: int, history: int = 20):
        if max_waiting < 0:
            raise PixsigmaError(f"max queue {max_waiting} is negative; expected 0 or more waiting requests")
        self.work = work
        self.max_waiting = max_waiting
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._durations: collections.deque[float] = collections.deque(maxlen=history)
        self._closed = False
        self.peak_pending = 0  # the most jobs waiting or running at once (<= max_waiting + 1)
        self.counts = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name="pixsigma-worker", daemon=True)
        self._thread.start()

    # -- clients ---------------------------------------------------------------------------------
    def submit(self, request, timeout_s: float) -> Job:
        """Queue a job for `request`; `QueueFull` when `max_waiting` jobs already wait."""
        with self._cond:
            if self._closed:
                raise PixsigmaError("the server is shutting down; expected no new requests")
            if len(self._waiting) + (self._running is not None) > self.max_waiting:
                self.counts["rejected"] += 1
                raise QueueFull(len(self._waiting), self.retry_after())
            job = Job(request, timeout_s)
            self._waiting.append(job)
            self.peak_pending = max(self.peak_pending, len(self._waiting) + (self._running is not None))
            self._cond.notify_all()
            return job

    def cancel(self, job: Job) -> None:
        """Take a waiting job out of the line, or stop a running one at its next step."""
        with self._cond:
            job._stop.set()
            if job in self._waiting:
                self._waiting.remove(job)
                job._finish(CANCELLED)
                self.counts[CANCELLED] += 1
        log.debug("job %s cancelled", job.id)

    def position(self, job: Job) -> int:
        """How many jobs are ahead of `job` (0: it runs next or now)."""
        with self._cond:
            try:
                return self._waiting.index(job) + (self._running is not None)
            except ValueError:
                return 0

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the mean recent job time times the jobs ahead."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(mean * (len(self._waiting) + 1)))

    def stats(self) -> dict:
        with self._cond:
            return {"waiting": len(self._waiting), "running": self._running is not None,
                    "max_queue": self.max_waiting, "peak_pending": self.peak_pending, **dict(self.counts)}

    def close(self, timeout: float = 5.0) -> None:
        """Cancel every waiting job, stop the running one and end the worker."""
        with self._cond:
            self._closed = True
            pending = list(self._waiting) + ([self._running] if self._running else [])
        for job in pending:
            self.cancel(job)
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- the worker ------------------------------------------------------------------------------
    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = self._running = self._waiting.popleft()
            job.state = RUNNING
            return job

    def _loop(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            start = time.monotonic()
            state, result, error = self._run(job)
            with self._cond:
                self._running = None
                if state == DONE:
                    self._durations.append(time.monotonic() - start)
                self.counts[state] += 1
            job._finish(state, result, error)

    def _run(self, job: Job) -> tuple[str, object, BaseException | None]:
        """Run one job; no exception leaves the worker (a failing job fails alone)."""
        try:
            job.check()
            return DONE, self.work(job), None
        except Stopped:
            return (CANCELLED if job._stop.is_set() else TIMED_OUT), None, None
        except PixsigmaError as e:
            return FAILED, None, e
        except Exception as e:  # noqa: BLE001 - reported to the client as a 500, the worker goes on
            log.exception("job %s failed", job.id)
            return FAILED, None, e
