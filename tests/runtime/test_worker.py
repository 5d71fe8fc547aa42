"""The CPU worker: one thread, jobs in order, errors handed back to the caller."""

import threading

import pytest
import torch

from fiddlerc.runtime.worker import CpuWorker


def test_jobs_run_in_order_on_the_worker_thread_with_its_thread_count():
    worker = CpuWorker(1)
    try:
        seen = []
        jobs = [
            worker.submit(lambda i: seen.append((i, threading.current_thread().name)) or i * i, i) for i in range(20)
        ]
        assert [j.result() for j in jobs] == [i * i for i in range(20)]
        assert seen == [(i, "fiddlerc-cpu") for i in range(20)]
        assert worker.submit(torch.get_num_threads).result() == 1
        assert worker.submit(torch.is_grad_enabled).result() is False
    finally:
        worker.close()


def test_an_error_in_a_job_reaches_its_caller_and_the_worker_goes_on():
    worker = CpuWorker(1)
    try:

        def boom():
            raise ValueError("expert 3 failed")

        job = worker.submit(boom)
        with pytest.raises(ValueError, match="expert 3 failed") as err:
            job.result()
        assert any(frame.name == "boom" for frame in err.traceback)  # with the worker's traceback
        assert worker.submit(lambda: 7).result() == 7
    finally:
        worker.close()


def test_close_finishes_what_was_handed_over_and_refuses_more():
    worker = CpuWorker(1)
    gate = threading.Event()
    first = worker.submit(gate.wait, 10)
    second = worker.submit(lambda: "done")
    threading.Timer(0.05, gate.set).start()
    worker.close()  # returns once both jobs ran
    assert first.result() is True and second.result() == "done"
    with pytest.raises(RuntimeError, match="worker was closed"):
        worker.submit(lambda: None)
    worker.close()  # again: nothing to do


def test_the_inline_worker_runs_each_job_on_the_caller_at_once():
    from fiddlerc.runtime.worker import InlineWorker

    worker = InlineWorker()
    ran = []
    job = worker.submit(lambda: ran.append(threading.current_thread()) or 5)
    assert ran == [threading.current_thread()] and job.result() == 5  # done before submit returned

    def boom():
        raise ValueError("expert 1 failed")

    with pytest.raises(ValueError, match="expert 1 failed"):
        worker.submit(boom).result()
    worker.close()
