"""The worker: runs sampling jobs one at a time off the event loop, streaming each step's state, cancellable."""

import math
import queue
import threading
import time

from fmlm import length
from fmlm.errors import FmlmError
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


class Worker:
    """One thread that runs every model call, fed by a bounded queue."""

    def __init__(self, limits: ServeLimits, threads: int = 1):
        self.limits = limits
        self.threads = threads
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=limits.max_queue)
        self.busy = False
        self.current: Job | None = None  # the job being computed
        self.served_requests = 0
        self.dropped_requests = 0  # clients that left before their result
        self._thread = threading.Thread(target=self._run, name="fmlm-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        try:
            self.queue.put(None, timeout=1.0)
        except queue.Full:
            pass
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
            job = self.queue.get()
            if job is None:
                return
            if job.cancelled.is_set():  # the client left while the job waited: drop it
                self.dropped_requests += 1
                continue
            self.busy, self.current = True, job
            try:
                result = self._execute(job)
                self._deliver(job, "done", result)
            except _Cancelled:
                self.dropped_requests += 1
            except FmlmError as e:
                self._deliver(job, "error", {"error": str(e), "status": 400})
            except Exception as e:  # a bug must not kill the worker; the client gets a 500
                self._deliver(job, "error", {"error": f"internal error: {type(e).__name__}: {e}", "status": 500})
            finally:
                self.busy, self.current = False, None
                self.served_requests += 1

    def _execute(self, job: Job) -> dict:
        model = job.served.model
        started = time.perf_counter()
        queue_seconds = started - job.enqueued
        kw = dict(job.options)
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

        def draw(seed: int):  # a stream shows the steps of every draw
            return model.sample_ids(job.num_samples, job.steps, seed, seq_len=job.seq_len, **kw)

        res = length.generate(draw, model.tokenizer, job.num_samples, job.seed, min_length, self.limits.max_tries, bos)
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
