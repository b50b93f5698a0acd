"""The worker behind `palmrl serve`: one thread owns the model and decodes batches of compatible jobs.

Requests queue for it as `Job`s. The worker batches: after taking a job it waits up to
`batching.window_ms` for others with the same sampling settings (temperature, top_p, top_k, no seed)
and decodes all their rows (n per prompt) in one KV-cache batch of at most
`batching.max_batch_size` rows through `Engine.stream`; each row still stops at its own max_tokens
and stop strings. A job with a `seed` is decoded alone, from its own generator, so it is
reproducible. Each step's deltas go back to the job's asyncio queue, then `END`.
scripts/bench_serve.py measures what batching buys.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from palmrl.generate import seeded_generator
from palmrl.serving.generator import Delta, Row, Sampling


@dataclass(frozen=True)
class Batching:
    """The `batching:` block of serve.yaml."""

    max_batch_size: int = 16  # rows decoded together; beyond ~16 a CPU step gets slower than it saves
    window_ms: float = 5.0  # wait this long after the first request for others to join; 0 = batch only what is queued


END = object()  # posted to a job's queue after its last deltas


class Job:
    """One request's rows; the worker posts lists of Delta (row = index within this job), then END."""

    def __init__(self, rows: list[Row], sampling: Sampling, seed: int | None, loop: asyncio.AbstractEventLoop):
        self.rows, self.sampling, self.seed, self.loop = rows, sampling, seed, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def batchable_with(self, other: Job) -> bool:
        return self.seed is None and other.seed is None and self.sampling == other.sampling

    def post(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Scheduler:
    """Queue of jobs in, batched decoding in a worker thread, deltas out to each job's asyncio queue."""

    def __init__(self, engine, batching: Batching, *, seed: int = 0, on_done=None):
        self.engine, self.batching = engine, batching
        self.generator = seeded_generator(int(seed), engine.device)
        self._queue: queue.Queue[Job] = queue.Queue()
        self._waiting: deque[Job] = deque()  # taken from the queue but not batchable with the last batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="palmrl-serve-worker", daemon=True)
        self._on_done = on_done  # called (in the job's event loop) when the worker is done with a job
        self.batches = 0
        self.rows_decoded = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def queued(self) -> int:
        return self._queue.qsize() + len(self._waiting)

    def _take(self, timeout: float) -> Job | None:
        if self._waiting:
            return self._waiting.popleft()
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _batch(self, first: Job) -> list[Job]:
        """`first` plus compatible jobs: the ones set aside earlier, then arrivals within the window."""
        batch, rows = [first], len(first.rows)
        if first.seed is not None:
            return batch
        room = lambda job: rows + len(job.rows) <= self.batching.max_batch_size  # noqa: E731
        kept_aside = deque()
        while self._waiting:
            job = self._waiting.popleft()
            if first.batchable_with(job) and room(job):
                batch.append(job)
                rows += len(job.rows)
            else:
                kept_aside.append(job)
        self._waiting = kept_aside
        deadline = time.monotonic() + self.batching.window_ms / 1000
        while rows < self.batching.max_batch_size:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic())) \
                    if deadline > time.monotonic() else self._queue.get_nowait()
            except queue.Empty:
                break
            if first.batchable_with(job) and room(job):
                batch.append(job)
                rows += len(job.rows)
            else:
                self._waiting.append(job)
        return batch

    def _work(self) -> None:
        while not self._stop.is_set():
            first = self._take(timeout=0.1)
            if first is None:
                continue
            batch = self._batch(first)
            live = [job for job in batch if not job.cancelled]  # clients that left before their turn cost nothing
            try:
                if live:
                    self._decode(live)
            except Exception as err:  # noqa: BLE001 - those requests get a 500, the server lives on
                for job in live:
                    job.post(err)
            finally:
                for job in batch:
                    job.post(END)
                    if self._on_done is not None:
                        job.loop.call_soon_threadsafe(self._on_done, job)

    def _decode(self, batch: list[Job]) -> None:
        rows, owner = [], []
        for job in batch:
            for i, row in enumerate(job.rows):
                rows.append(row)
                owner.append((job, i))
        generator = self.generator if batch[0].seed is None else seeded_generator(batch[0].seed, self.engine.device)
        self.batches += 1
        self.rows_decoded += len(rows)
        for deltas in self.engine.stream(rows, batch[0].sampling, generator=generator):
            per_job: dict[int, list[Delta]] = {}
            for d in deltas:
                job, i = owner[d.row]
                per_job.setdefault(id(job), []).append(d._replace(row=i))
            for job in batch:
                if id(job) in per_job and not job.cancelled:
                    job.post(per_job[id(job)])
            if all(job.cancelled for job in batch):
                return
