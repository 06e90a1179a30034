"""Batching for the server: the job queue that gathers compatible requests, and per-request random streams.

:class:`JobQueue` holds the waiting jobs (bounded). :meth:`JobQueue.take` gives the worker the
oldest job together with the waiting jobs of the same *batch key* (model and settings), up to
``max_rows`` sequences, waiting at most ``window`` seconds after the oldest job arrived for more
to come (``window`` 0: only what is already waiting; while a batch runs, new requests pile up
and go together into the next one).

:class:`RowStreams` makes a batched draw reproduce the unbatched ones: inside it, every random
draw the sampler makes with a generator (``torch.randn``, ``rand``, ``randint``) is split along
its first (batch) dimension into one chunk per request, each drawn from that request's own
generator seeded with its seed. Every sampler draws its noise batch-first, in the same order
whatever the batch size, so request r's rows get exactly (bit for bit) the noise they get
alone. The network then sees a larger batch: its outputs for a row are the same function of
that row, up to the rounding of matrix products that a different batch size may bring (on CPU
we observe none in the tests; on other devices kernels chosen by batch size may round
differently), so a request's tokens equal its unbatched tokens unless two logits tie within
rounding.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Sequence

import torch
from torch.overrides import TorchFunctionMode

#: The random functions RowStreams splits per request; any other draw with a generator is refused.
_SPLIT = {torch.randn, torch.rand, torch.randint}


class Unsplittable(RuntimeError):
    """A draw inside :class:`RowStreams` that cannot be split per request (the batch is then run job by job)."""


class RowStreams(TorchFunctionMode):
    """Per-request random streams for one batched sampler call.

    ``parts``: (seed, rows) per request, in batch order; ``device``: where the generators live.
    """

    def __init__(self, parts: Sequence[tuple[int, int]], device):
        super().__init__()
        self.parts = [(torch.Generator(device).manual_seed(int(seed)), int(rows)) for seed, rows in parts]
        self.total = sum(n for _, n in self.parts)
        self.draws = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("generator") is None:
            return func(*args, **kwargs)
        if func not in _SPLIT:
            raise Unsplittable(f"{getattr(func, '__name__', func)} with a generator cannot be split per request")
        args, size = _split_size(func, args, kwargs)
        if len(size) == 0 or size[0] != self.total:
            raise Unsplittable(f"a draw of shape {tuple(size)} is not batch-first over {self.total} rows")
        self.draws += 1
        chunks = []
        for gen, n in self.parts:
            kw = dict(kwargs, generator=gen)
            chunks.append(func(*args, (n, *size[1:]), **kw))
        return torch.cat(chunks)


def _split_size(func, args: tuple, kwargs: dict) -> tuple[tuple, tuple]:
    """(the other positional arguments, the size) of a randn/rand/randint call; ``kwargs`` loses ``size``."""
    if "size" in kwargs:
        return args, tuple(kwargs.pop("size"))
    if func is torch.randint:  # randint(high, size) or randint(low, high, size)
        return args[:-1], tuple(args[-1])
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return (), tuple(args[0])
    return (), tuple(args)


class JobQueue:
    """The waiting jobs, at most ``maxsize``; ``take`` hands the worker a batch of them.

    The interface the server and its tests read: ``qsize()``, ``queue`` (a snapshot list of the
    waiting jobs), ``put_nowait`` (raises ``queue.Full``) and ``close()``."""

    def __init__(self, maxsize: int, clock=time.perf_counter):
        self.maxsize = maxsize
        self.clock = clock
        self._jobs: deque = deque()
        self._cond = threading.Condition()
        self._closed = False

    def qsize(self) -> int:
        with self._cond:
            return len(self._jobs)

    @property
    def queue(self) -> list:
        with self._cond:
            return list(self._jobs)

    def put_nowait(self, job) -> None:
        with self._cond:
            if len(self._jobs) >= self.maxsize:
                raise queue.Full
            self._jobs.append(job)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, max_rows: int, window: float) -> list | None:
        """The next batch: the oldest job, and waiting jobs with its batch key (oldest first) while
        their rows fit in ``max_rows``; None once closed. A job without a batch key (a stream, a
        request with retries) or a cancelled one goes alone. The batch closes when full, when
        ``window`` seconds have passed since the oldest job was enqueued, or on close."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._jobs[0]
            key = first.batch_key
            while True:
                batch = [first]
                if key is not None and not first.cancelled.is_set():
                    rows = first.num_samples
                    for job in list(self._jobs)[1:]:
                        if rows >= max_rows:
                            break
                        if job.batch_key == key and not job.cancelled.is_set() and rows + job.num_samples <= max_rows:
                            batch.append(job)
                            rows += job.num_samples
                    left = first.enqueued + window - self.clock()
                    if rows < max_rows and left > 0 and not self._closed:
                        self._cond.wait(left)
                        continue
                for job in batch:
                    self._jobs.remove(job)
                return batch
