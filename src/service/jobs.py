"""The job queue: bounded, in memory, feeding one worker thread per device.

A job is ``queued`` until a worker takes it (or it is ``cancelled``, or ``expired`` when its deadline passes
first), then ``running`` until it ``succeeded``, ``failed`` or was ``cancelled``: a running job is stopped at its
next denoising step by raising :class:`~src.pipelines.text_to_image.GenerationCancelled` from its step callback.
Submitting to a full queue raises :class:`QueueFull` with a wait estimate (the HTTP layer's 429 + Retry-After).
Every change is an event in the job's list — what ``/v1/jobs/{id}/events`` streams, numbered so a client can
resume — and wakes the asyncio tasks watching it. Generation runs in the worker threads, never on the event loop.
The queue is lost when the process stops; finished jobs beyond ``keep_jobs`` are forgotten, oldest first, and
their files deleted through ``on_forget``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from src.pipelines.text_to_image import GenerationCancelled
from src.service.storage import new_id

__all__ = ["TERMINAL", "Job", "JobConflict", "JobQueue", "QueueFull"]

log = logging.getLogger(__name__)

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})


class QueueFull(Exception):
    """The queue holds as many waiting jobs as it may; ``retry_after``: seconds until one slot is likely free."""

    def __init__(self, capacity: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({capacity} jobs waiting): try again in {retry_after} s")
        self.retry_after = retry_after


class JobConflict(Exception):
    """The job is in a state that does not allow what was asked (e.g. cancelling a finished job)."""


@dataclass
class Job:
    """One request and everything that happened to it."""

    id: str
    request: Any
    deadline: float  # time.monotonic() by which it must have started
    created_at: float = field(default_factory=time.time)
    state: str = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    progress: tuple[int, int] = (0, 0)
    cancel_requested: bool = False
    result: Any = None  # whatever the runner returned (the HTTP layer's image list and manifest)
    error: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    watchers: set[asyncio.Event] = field(default_factory=set)

    @property
    def kind(self) -> str:
        return self.request.kind


Runner = Callable[[Job, int, Callable[[int, int], None]], Any]  # (job, worker index, on_step) -> result


class JobQueue:
    """``submit`` jobs, ``cancel`` them, watch their ``events``; ``workers`` threads run them with ``runner``."""

    def __init__(
        self,
        runner: Runner,
        workers: int,
        capacity: int,
        keep: int,
        on_forget: Callable[[Job], None] | None = None,
    ) -> None:
        self.runner = runner
        self.workers = workers
        self.capacity = capacity
        self.keep = keep
        self.on_forget = on_forget
        self.jobs: dict[str, Job] = {}
        self.pending: collections.deque[Job] = collections.deque()
        self.finished: collections.deque[str] = collections.deque()
        self.running = 0
        self.peak_queued = 0
        self.seconds_per_job = 5.0  # a running mean of finished jobs' durations, for Retry-After
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.threads: list[threading.Thread] = []
        self.stopping = False

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the worker threads; ``loop`` is where watchers wait."""
        with self.lock:
            if self.stopping:  # stopped while the models were still loading
                return
            self.loop = loop
        for index in range(self.workers):
            thread = threading.Thread(
                target=self._work, args=(index,), name=f"generation-worker-{index}", daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what runs and waits, then join the workers."""
        with self.lock:
            self.stopping = True
            for job in self.jobs.values():
                if job.state == "running":
                    job.cancel_requested = True
            while self.pending:
                self._finish(self.pending.popleft(), "cancelled", error="the server stopped")
            self.wake.notify_all()
        for thread in self.threads:
            thread.join(timeout)

    # --- what the HTTP layer calls ------------------------------------------------------------------------------

    def submit(self, request: Any, deadline_s: float) -> Job:
        """Queue ``request``; QueueFull when ``capacity`` jobs already wait."""
        with self.lock:
            self._expire_overdue()
            if len(self.pending) >= self.capacity:
                raise QueueFull(self.capacity, self._retry_after())
            job = Job(new_id(), request, deadline=time.monotonic() + deadline_s)
            self.jobs[job.id] = job
            self.pending.append(job)
            self.peak_queued = max(self.peak_queued, len(self.pending))
            self._publish(job, "state", {"state": "queued"})
            self.wake.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            self._expire_overdue()
            return self.jobs.get(job_id)

    def snapshot(self) -> list[Job]:
        """The jobs remembered now (queued, running and the last ``keep`` finished ones)."""
        with self.lock:
            self._expire_overdue()
            return list(self.jobs.values())

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, or ask a running one to stop at its next step; JobConflict when done."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if job.state in TERMINAL:
                raise JobConflict(f"job {job_id} already {job.state}")
            job.cancel_requested = True
            if job.state == "queued":
                self.pending.remove(job)
                self._finish(job, "cancelled")
            else:
                self._publish(job, "state", {"state": job.state, "cancel_requested": True})
            return job

    def queue_position(self, job: Job) -> int | None:
        with self.lock:
            return self.pending.index(job) + 1 if job.state == "queued" and job in self.pending else None

    def expire_overdue(self) -> None:
        """Expire queued jobs whose deadline passed (called periodically, so they expire on time)."""
        with self.lock:
            self._expire_overdue()

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {
                "queued": len(self.pending),
                "running": self.running,
                "capacity": self.capacity,
                "workers": self.workers,
                "peak_queued": self.peak_queued,
            }

    async def events(self, job: Job, after: int = 0) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """``(number, event)`` of ``job`` from event ``after`` on, until the job has ended; waits for new ones."""
        watcher = asyncio.Event()
        with self.lock:
            job.watchers.add(watcher)
        try:
            while True:
                with self.lock:
                    watcher.clear()
                    new = job.events[after:]
                    ended = job.state in TERMINAL
                for event in new:
                    after += 1
                    yield after, event
                if ended and not new:
                    return
                if not new:
                    await watcher.wait()
        finally:
            with self.lock:
                job.watchers.discard(watcher)

    async def wait(self, job: Job, timeout: float) -> bool:
        """Wait until ``job`` has ended; False when ``timeout`` seconds passed first."""
        try:
            async with asyncio.timeout(timeout):
                async for _ in self.events(job):
                    pass
        except TimeoutError:
            return False
        return True

    # --- the workers ------------------------------------------------------------------------------------------

    def _work(self, index: int) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            self._run(job, index)

    def _next(self) -> Job | None:
        with self.lock:
            while True:
                self._expire_overdue()
                if self.stopping:
                    return None
                if self.pending:
                    job = self.pending.popleft()
                    job.state, job.started_at = "running", time.time()
                    self.running += 1
                    self._publish(job, "state", {"state": "running"})
                    return job
                self.wake.wait(timeout=1.0)

    def _run(self, job: Job, index: int) -> None:
        def on_step(done: int, total: int) -> None:
            with self.lock:
                job.progress = (done, total)
                self._publish(job, "progress", {"done": done, "total": total})
                stop = job.cancel_requested
            if stop:
                raise GenerationCancelled(job.id)

        began = time.monotonic()
        try:
            result = self.runner(job, index, on_step)
        except GenerationCancelled:
            state, result, error = "cancelled", None, None
        except Exception as failure:  # a job that fails must not take the worker down
            state, result, error = "failed", None, self._describe(failure)
            if not isinstance(failure, ValueError):
                log.exception("job %s failed", job.id)
        else:
            state, error = "succeeded", None
        seconds = time.monotonic() - began
        with self.lock:
            self.running -= 1
            self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * seconds
            job.result = result
            self._finish(job, state, error)
        log.info(
            "job %s %s %s in %.2f s (waited %.2f s)",
            job.id,
            job.kind,
            state,
            seconds,
            (job.started_at or job.created_at) - job.created_at,
        )

    @staticmethod
    def _describe(failure: Exception) -> str:
        if isinstance(failure, ValueError):  # the input's fault: its message says what to change
            return " ".join(str(failure).split())
        return f"internal error ({type(failure).__name__}); the server log has the details"

    # --- under the lock ---------------------------------------------------------------------------------------

    def _expire_overdue(self) -> None:
        now = time.monotonic()
        for job in [job for job in self.pending if job.deadline < now]:
            self.pending.remove(job)
            self._finish(job, "expired", error="not started before its deadline")

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        job.state, job.error, job.finished_at = state, error, time.time()
        self._publish(job, "state", {"state": state, **({"error": error} if error else {})})
        self.finished.append(job.id)
        while len(self.finished) > self.keep:
            forgotten = self.jobs.pop(self.finished.popleft(), None)
            if forgotten is not None and self.on_forget is not None:
                self.on_forget(forgotten)

    def _publish(self, job: Job, kind: str, data: dict[str, Any]) -> None:
        job.events.append({"event": kind, "data": data})
        if self.loop is not None:
            for watcher in job.watchers:
                self.loop.call_soon_threadsafe(watcher.set)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the running mean job time, times the jobs ahead, per worker."""
        with self.lock:
            return self._retry_after()

    def _retry_after(self) -> int:
        waiting = len(self.pending) + self.running
        return max(1, min(3600, math.ceil(self.seconds_per_job * waiting / self.workers)))
