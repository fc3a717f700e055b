"""The serving queue: one worker, a bounded line, cancellation, deadlines, failures kept to their job."""

import threading
import time

import pytest

from pixsigma.errors import PixsigmaError
from pixsigma.serve.config import ServeConfig, is_loopback
from pixsigma.serve.queue import CANCELLED, DONE, FAILED, TIMED_OUT, JobQueue, QueueFull


class GatedWork:
    """Work that blocks at a gate, calling job.check() while it waits (as the pipeline does per step)."""

    def __init__(self):
        self.gate = threading.Event()
        self.started = []
        self.ran = []

    def __call__(self, job):
        self.started.append(job.request)
        while not self.gate.wait(0.01):
            job.check()
        if job.request == "boom":
            raise RuntimeError("boom")
        if job.request == "bad":
            raise PixsigmaError("bad input")
        self.ran.append(job.request)
        return f"result {job.request}"


def wait_until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


@pytest.fixture
def work():
    return GatedWork()


@pytest.fixture
def queue(work):
    q = JobQueue(work, max_waiting=2)
    yield q
    work.gate.set()
    q.close()


def test_line_is_bounded_and_runs_in_order(queue, work):
    jobs = [queue.submit("a", 10)]
    wait_until(lambda: work.started == ["a"])
    jobs += [queue.submit("b", 10), queue.submit("c", 10)]
    with pytest.raises(QueueFull) as e:
        queue.submit("d", 10)
    assert e.value.retry_after >= 1
    assert queue.stats()["waiting"] == 2 and queue.stats()["running"]
    assert [queue.position(j) for j in jobs] == [0, 1, 2]
    work.gate.set()
    for job in jobs:
        assert job.wait(5)
    assert [j.state for j in jobs] == [DONE] * 3
    assert work.ran == ["a", "b", "c"]
    assert jobs[2].result == "result c"
    assert queue.stats()["peak_pending"] == 3 and queue.stats()["rejected"] == 1


def test_cancelled_waiting_job_frees_its_slot_at_once(queue, work):
    queue.submit("a", 10)
    wait_until(lambda: work.started == ["a"])
    b, c = queue.submit("b", 10), queue.submit("c", 10)
    queue.cancel(b)
    assert b.done and b.state == CANCELLED
    queue.submit("d", 10)  # b's slot is free again
    work.gate.set()
    assert c.wait(5)
    wait_until(lambda: queue.stats()["waiting"] == 0 and not queue.stats()["running"])
    assert "b" not in work.started and work.ran == ["a", "c", "d"]


def test_cancelled_running_job_stops_at_its_next_check(queue, work):
    a = queue.submit("a", 10)
    wait_until(lambda: work.started == ["a"])
    queue.cancel(a)
    assert a.wait(2) and a.state == CANCELLED and a.result is None
    b = queue.submit("b", 10)
    work.gate.set()
    assert b.wait(5) and b.state == DONE


def test_deadline_stops_a_running_job_and_skips_a_waiting_one(queue, work):
    a = queue.submit("a", 0.2)
    b = queue.submit("b", 0.2)
    assert a.wait(3) and a.state == TIMED_OUT
    assert b.wait(3) and b.state == TIMED_OUT
    assert work.started == ["a"]  # b was past its deadline before it could start


def test_a_failing_job_fails_alone(queue, work):
    work.gate.set()
    boom, bad, ok = queue.submit("boom", 10), queue.submit("bad", 10), queue.submit("ok", 10)
    assert ok.wait(5)
    assert boom.state == FAILED and isinstance(boom.error, RuntimeError)
    assert bad.state == FAILED and isinstance(bad.error, PixsigmaError)
    assert ok.state == DONE and ok.result == "result ok"


def test_zero_waiting_admits_only_the_running_job(work):
    q = JobQueue(work, max_waiting=0)
    try:
        a = q.submit("a", 10)
        with pytest.raises(QueueFull):
            q.submit("b", 10)
        work.gate.set()
        assert a.wait(5)
        wait_until(lambda: not q.stats()["running"])
        assert q.submit("c", 10).wait(5)
    finally:
        q.close()


def test_close_cancels_everything(work):
    q = JobQueue(work, max_waiting=4)
    a = q.submit("a", 10)
    wait_until(lambda: work.started == ["a"])
    b = q.submit("b", 10)
    q.close()
    assert a.state == CANCELLED and b.state == CANCELLED
    with pytest.raises(PixsigmaError, match="shutting down"):
        q.submit("c", 10)


@pytest.mark.parametrize("host, ok", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True),
                                      ("0.0.0.0", False), ("192.168.1.5", False), ("example.org", False)])
def test_only_loopback_without_allow_remote(host, ok):
    assert is_loopback(host) == ok
    if ok:
        ServeConfig(host=host).check()
    else:
        with pytest.raises(PixsigmaError, match="--allow-remote"):
            ServeConfig(host=host).check()
        ServeConfig(host=host, allow_remote=True).check()


@pytest.mark.parametrize("kwargs, match", [({"max_queue": -1}, "--max-queue"), ({"timeout_s": 0}, "--timeout"),
                                           ({"api_key": " "}, "API key"), ({"port": 70000}, "--port")])
def test_bad_settings(kwargs, match):
    with pytest.raises(PixsigmaError, match=match):
        ServeConfig(**kwargs).check()
