"""The worker: runs sampling jobs one at a time off the event loop, streaming each step's state, cancellable."""

import math
import queue
import threading
import time

from fmlm import length, long
from fmlm.errors import FmlmError
from fmlm.serve.batching import JobQueue, RowStreams, Unsplittable
from fmlm.serve.requests import BadRequest, Job, ServeLimits


class _Cancelled(Exception):
    """Raised from the sampler callback when the client of a stream has gone."""


def snapshot(method: str, state: dict, i: int, z, d) -> tuple[list[int], list[float]]:
    """Sample 0's current decoded tokens and their confidence from a sampler callback.

    Flow / flow-map / Duo: argmax of the prediction ``d`` (B, L, V) and its probability.
    MDLM: ``d`` is x_θ over V + 1 ids (the last is the mask); revealed positions show their token
    with confidence 1, masked ones the denoiser's argmax and its probability.
    AR: ``z`` holds the tokens drawn so far and ``d`` the logits of the newest one.
    """
    if method == "ar":
        conf = state.setdefault("conf", [])
        conf.append(float(d[0].float().softmax(-1)[z[0, -1]]))
        return z[0].tolist(), list(conf)
    if method == "mdlm":
        V = d.shape[-1] - 1
        p, ids = d[0, :, :V].float().max(-1)
        revealed = z[0] != V
        ids = ids.where(~revealed, z[0])
        p = p.where(~revealed, p.new_ones(()))
        return ids.tolist(), p.tolist()
    p, ids = d[0].float().max(-1)
    return ids.tolist(), p.tolist()


def job_conditioning(job: Job) -> dict:
    """The per-row known tokens of a job (an OpenAI completion's prompts) as sampler options."""
    out = {}
    if job.known is not None:
        out["known"] = job.known
    if job.mask is not None:
        out["mask"] = job.mask
    return out


def draw_batch(jobs: list[Job], callback) -> list:
    """One batched ``sample_ids`` call for jobs of one batch key, each with its own seed's noise
    (:class:`RowStreams`); returns each job's rows (num_samples, L)."""
    import torch

    head, total = jobs[0], sum(j.num_samples for j in jobs)
    kw = dict(head.options)
    if head.mask is not None:  # per-row prompts: stacked
        kw["known"] = torch.cat([j.known for j in jobs])
        kw["mask"] = torch.cat([j.mask for j in jobs])
    elif head.known is not None:  # one prefix for the whole batch (the batch key holds it)
        kw["known"] = head.known
    model = head.served.model
    with RowStreams([(j.seed, j.num_samples) for j in jobs], model.device):
        raw = model.sample_ids(
            total, head.steps, head.seed, seq_len=head.seq_len, callback=callback, batch_size=total, **kw
        )
    return list(raw.split([j.num_samples for j in jobs]))


class Worker:
    """One thread that runs every model call, fed by a bounded queue that gathers batches
    (:class:`fmlm.serve.batching.JobQueue`)."""

    def __init__(self, limits: ServeLimits, threads: int = 1):
        self.limits = limits
        self.threads = threads
        self.queue = JobQueue(limits.max_queue)
        self.busy = False
        self.current: Job | None = None  # the (first) job being computed
        self.served_requests = 0
        self.dropped_requests = 0  # clients that left before their result
        self.batches = 0  # forward passes shared by more than one request
        self._thread = threading.Thread(target=self._run, name="fmlm-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.queue.close()
        self._thread.join(timeout=5.0)

    def submit(self, job: Job) -> None:
        job.enqueued = time.perf_counter()
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise BadRequest(
                f"server busy: {self.limits.max_queue} requests are already waiting; retry later", 503
            ) from None

    # -- inside the worker thread
    def _run(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        torch.set_flush_denormal(True)  # per thread: denormals late in the flow are very slow on CPUs
        while True:
            jobs = self.queue.take(self.limits.batch_max, self.limits.batch_window)
            if jobs is None:
                return
            live = [j for j in jobs if not j.cancelled.is_set()]  # the clients that left while waiting
            self.dropped_requests += len(jobs) - len(live)
            if not live:
                continue
            self.busy, self.current = True, live[0]
            try:
                for job, result in zip(live, self._execute_batch(live)):
                    if result is None:
                        self.dropped_requests += 1
                    else:
                        self._deliver(job, "done", result)
            except _Cancelled:
                self.dropped_requests += len(live)
            except FmlmError as e:
                for job in live:
                    self._deliver(job, "error", {"error": str(e), "status": 400})
            except Exception as e:  # a bug must not kill the worker; the client gets a 500
                for job in live:
                    self._deliver(job, "error", {"error": f"internal error: {type(e).__name__}: {e}", "status": 500})
            finally:
                self.busy, self.current = False, None
                self.served_requests += len(live)

    def _execute_batch(self, jobs: list[Job]) -> list[dict | None]:
        """Each job's answer (None: its client left); more than one job: one batched draw."""
        if len(jobs) == 1:
            return [self._execute(jobs[0])]
        started = time.perf_counter()
        try:
            raws = draw_batch(jobs, self._batch_callback(jobs))
        except Unsplittable:  # a sampler whose draws RowStreams cannot split: one job at a time
            return [self._alone(job) for job in jobs]
        self.batches += 1
        meta = {"batch_requests": len(jobs), "batch_rows": sum(j.num_samples for j in jobs)}
        return [
            None if job.cancelled.is_set() else self._execute(job, first=raw, started=started, meta=meta)
            for job, raw in zip(jobs, raws)
        ]

    def _alone(self, job: Job) -> dict | None:
        try:
            return self._execute(job)
        except _Cancelled:
            return None

    @staticmethod
    def _batch_callback(jobs: list[Job]):
        def callback(i, z, d):  # a batch stops only when every one of its clients has gone
            if all(job.cancelled.is_set() for job in jobs):
                raise _Cancelled()

        return callback

    def _execute(self, job: Job, first=None, started: float | None = None, meta: dict | None = None) -> dict:
        """A job's answer; ``first``: its rows of a batched draw (then ``started`` is when the batch began)."""
        model = job.served.model
        started = time.perf_counter() if started is None else started
        queue_seconds = started - job.enqueued
        kw = dict(job.options, **job_conditioning(job))
        if job.stream:
            stride = max(1, math.ceil(job.steps / job.max_events))
            state: dict = {}
            method = job.served.method
            total = job.seq_len if method == "ar" else job.steps

            def callback(i, z, d):
                if job.cancelled.is_set():
                    raise _Cancelled()
                if i % stride == 0 or i == total - 1:
                    ids, conf = snapshot(method, state, i, z, d)
                    self._emit(
                        job,
                        "step",
                        {
                            "step": i + 1,
                            "of": total,
                            "ids": ids,
                            "tokens": [model.tokenizer.decode([t]) for t in ids],
                            "confidence": [round(c, 4) for c in conf],
                            "seconds": time.perf_counter() - started,
                        },
                    )
                elif method == "ar":
                    snapshot(method, state, i, z, d)  # AR keeps every drawn token's probability

            kw["callback"] = callback
        else:

            def callback(i, z, d):  # the client of a JSON request may go away too
                if job.cancelled.is_set():
                    raise _Cancelled()

            kw["callback"] = callback
        min_length, bos = kw.pop("min_length", 0), kw.get("bos", False)
        long_len, context = kw.pop("length", 0), kw.pop("context", None)

        def draw(seed: int):  # a stream shows the steps of every draw
            nonlocal first
            if first is not None and seed == job.seed:  # the batch drew it
                out, first = first, None
                return out
            return model.sample_ids(job.num_samples, job.steps, seed, seq_len=job.seq_len, **kw)

        meta = dict(meta or {"batch_requests": 1, "batch_rows": job.num_samples})
        if job.finish is not None:  # an OpenAI completion
            raw = draw(job.seed)
            return job.finish(
                job, raw, {"seconds": time.perf_counter() - started, "queue_seconds": queue_seconds, **meta}
            )
        if long_len:  # a long text, block by block (fmlm.long); never batched, never streamed
            rest = {k: v for k, v in kw.items() if k != "bos"}
            n, tries = job.num_samples, self.limits.max_tries
            res = long.generate(
                model, n, job.steps, job.seed, long_len, context, min_length, tries, bos, job.seq_len, **rest
            )
        else:
            res = length.generate(
                draw, model.tokenizer, job.num_samples, job.seed, min_length, self.limits.max_tries, bos
            )
        seconds = time.perf_counter() - started
        out = {
            "model": job.served.name,
            "method": job.served.method,
            "steps": job.steps,
            "seed": job.seed,
            "num_samples": job.num_samples,
            "seq_len": job.seq_len,
            "texts": res.texts,  # each cut before its first EOS (fmlm.length)
            "ids": res.ids,
            "ended": res.ended,
            "raw_ids": res.raw.tolist(),  # the fixed-length blocks
            "rejected": res.rejected,  # dropped: shorter than min_length after `tries` draws
            "tries": res.tries,
            "seconds": seconds,
            "queue_seconds": queue_seconds,
            **meta,
        }
        if job.stream:
            out["tokens"] = [model.tokenizer.decode([t]) for t in out["ids"][0]] if out["ids"] else []
        return out

    def _emit(self, job: Job, kind: str, data: dict) -> None:
        job.loop.call_soon_threadsafe(job.events.put_nowait, (kind, data))

    def _deliver(self, job: Job, kind: str, data: dict) -> None:
        if job.stream:
            self._emit(job, kind, data)
            return

        def settle():
            if not job.future.done():
                job.future.set_result((kind, data))

        job.loop.call_soon_threadsafe(settle)
