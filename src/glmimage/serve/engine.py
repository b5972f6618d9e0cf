"""The serving engine: one worker thread owns the pipeline; requests wait in a bounded queue and compatible ones
(same size, steps, guidance, sampling settings, no condition images) run as one batch, each row with its own seed
so that batching never changes an image."""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time

from PIL import Image

log = logging.getLogger("glmimage.serve")


class QueueFull(Exception):
    """Raised by `Engine.submit` when the queue is full (the API answers 429)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request: n images of one prompt. params: the pipeline's keyword arguments shared by a batch."""
    prompt: str
    seeds: list[int]
    params: dict
    images: list[Image.Image] = dataclasses.field(default_factory=list)
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    state: str = "queued"  # queued -> running -> done, or queued -> cancelled
    enqueued: float = dataclasses.field(default_factory=time.perf_counter)

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys share a batch; jobs with condition images run alone."""
        return None if self.images else tuple(sorted(self.params.items()))


class Engine:
    """A bounded queue in front of a pipeline, served by one thread that batches compatible jobs."""

    def __init__(self, pipe, *, max_queue: int = 16, max_batch: int = 4, batch_wait: float = 0.01) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be >= 1")
        self.pipe, self.max_queue, self.max_batch, self.batch_wait = pipe, max_queue, max_batch, batch_wait
        self._jobs: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.batches_run = 0
        self._thread = threading.Thread(target=self._loop, name="glmimage-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        with self._cv:
            return len(self._jobs)

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._cv:
            if self._closed:
                raise RuntimeError("engine is closed")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are waiting (limit {self.max_queue})")
            self._jobs.append(job)
            self._cv.notify()
        return job.future

    def cancel(self, job: Job) -> bool:
        """Drop a job that has not started (its client went away or timed out): its queue slot is free at once."""
        with self._cv:
            if job.state != "queued":
                return False
            job.state = "cancelled"
            self._jobs.remove(job)
        job.future.cancel()
        return True

    def close(self) -> None:
        """Stop the worker; jobs still waiting fail at once (their clients get an error, not a timeout)."""
        with self._cv:
            self._closed = True
            waiting, self._jobs = list(self._jobs), collections.deque()
            self._cv.notify_all()
        for job in waiting:
            job.state = "cancelled"
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("server shutting down"))
        self._thread.join(timeout=5)

    def _take_batch(self) -> list[Job] | None:
        with self._cv:
            while not self._jobs and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            first = self._jobs.popleft()
            first.state = "running"
            batch, rows, key = [first], len(first.seeds), first.batch_key()
            if key is None:
                return batch
            deadline = time.monotonic() + self.batch_wait
            while rows < self.max_batch:
                match = next((j for j in self._jobs if j.batch_key() == key and rows + len(j.seeds) <= self.max_batch),
                             None)
                if match is not None:
                    self._jobs.remove(match)
                    match.state = "running"
                    batch.append(match)
                    rows += len(match.seeds)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            # a future cancelled from the asyncio side is dropped here, and can no longer be cancelled after this
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001  the worker must survive anything a request can cause
                if not isinstance(e, ValueError):
                    log.exception("generation failed")
                if isinstance(e, StopIteration):  # asyncio cannot carry it across wrap_future: the waiter would hang
                    e = RuntimeError(f"generation failed: {type(e).__name__}")
                for j in batch:
                    j.state = "done"
                    if not j.future.done():
                        j.future.set_exception(e)

    def _run(self, batch: list[Job]) -> None:
        prompts = [j.prompt for j in batch for _ in j.seeds]
        seeds = [s for j in batch for s in j.seeds]
        started = time.perf_counter()
        result = self.pipe(prompts, images=batch[0].images or None, seed=seeds, progress=False, **batch[0].params)
        self.batches_run += 1
        i = 0
        for j in batch:
            n = len(j.seeds)
            timings = dict(result.timings, queue=started - j.enqueued, batch_rows=len(prompts))
            j.state = "done"
            j.future.set_result((result.images[i:i + n], timings))
            i += n
