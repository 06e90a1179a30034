"""``fmlm serve``: an HTTP API and a live web page of the denoising.

Endpoints (JSON in, JSON out; every 4xx carries ``{"error": "<one clear line>"}``):

* ``GET  /health``          status, the served models and the queue depth.
* ``POST /v1/generate``     ``{"model", "num_samples", "steps", "seed", "seq_len", "gamma", "prefix"}``
  (all optional) -> ``{"texts", "ids", "seconds", "queue_seconds", ...}``.
* ``POST /v1/stream``       the same body (one sample); server-sent events ``step`` (the argmax of the
  current denoiser / flow-map prediction and its probability per token, after every network
  evaluation, thinned to at most ``max_events``), then ``done`` (the final text and timings) or ``error``.
* ``GET  /``                the web page (FLM many-step and FMLM one-step side by side).

All models run in ONE worker thread (PyTorch, ``threads`` intra-op threads), fed by a bounded
queue: a request that finds the queue full is answered 503 at once, so the server never builds up
unbounded work. Requests are not merged into one batch: each keeps its own seed, so the same
request always gives the same text. The event loop only parses, validates and waits.

Conditioning: ``prefix`` (text the sample starts with), ``suffix`` (text it ends with; with or
without a prefix) and ``infill`` (a template such as ``"The [MASK:5] of York"``) go to
:meth:`fmlm.api.Model.sample_ids`. FLM, FMLM, MDLM and Duo take all three, AR only a prefix; a
field the model cannot take is answered 400 "... does not apply to model ...".

Hostile input: every malformed body gets a 4xx with one line, never a 500: bodies over
``max_body_bytes`` (413), JSON nested deeper than ``max_json_depth``, numbers longer than
``max_number_chars`` characters, NaN/Infinity, wrong types and ranges (400). A request whose
client disconnects while it waits or runs is dropped (the worker skips it, or stops it at the
next network evaluation). ``/docs`` and ``/openapi.json`` exist only with ``docs=True``
(``fmlm serve --docs``). There is no authentication: bind beyond loopback only on a network you
trust (``fmlm serve`` warns).
"""


import asyncio
import errno
import inspect
import ipaddress
import json
import math
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fmlm.errors import FmlmError

#: Request fields passed through to the sampler when the model API accepts them.
CONDITIONING_FIELDS = ("prefix", "suffix", "infill")
_FIELDS = {"model", "num_samples", "steps", "seed", "seq_len", "gamma", "max_events", *CONDITIONING_FIELDS}


@dataclass
class ServeLimits:
    """What one request may ask for, and how much work may wait."""

    max_steps: int = 1024
    max_samples: int = 16
    max_body_bytes: int = 16_384
    max_text_chars: int = 4_096
    max_queue: int = 8
    max_events: int = 64
    max_json_depth: int = 4
    max_number_chars: int = 32


class BadRequest(Exception):
    """A client error: HTTP ``status`` with a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class _Cancelled(Exception):
    """Raised from the sampler callback when the client of a stream has gone."""


# --------------------------------------------------------------------------- models
@dataclass
class Served:
    """One named model and what the server knows about it."""

    name: str
    model: Any  # fmlm.api.Model
    conditioning: tuple[str, ...] = ()

    @property
    def method(self) -> str:
        return self.model.config.train.method

    @property
    def max_seq_len(self) -> int:
        return self.model.config.model.max_seq_len

    def info(self) -> dict:
        cfg = self.model.config
        return {"method": self.method, "vocab_size": cfg.model.vocab_size, "seq_len": cfg.data.seq_len,
                "max_seq_len": self.max_seq_len, "default_steps": cfg.sample.steps,
                "conditioning": list(self.conditioning), "checkpoint": self.model.path.name,
                "separator": _separator(self.model.tokenizer)}


def _separator(tokenizer) -> str:
    """What the tokenizer puts between decoded tokens (words: a space; characters, BPE: nothing)."""
    return " " if getattr(tokenizer, "_space_joined", False) or getattr(tokenizer, "space_joined", False) else ""


def wrap_model(name: str, model) -> Served:
    """A model to serve, with the conditioning fields its sampler takes (:attr:`Model.conditioning`)."""
    return Served(name, model, tuple(f for f in CONDITIONING_FIELDS if f in getattr(model, "conditioning", ())))


def parse_ckpt_args(items: list[str]) -> list[tuple[str, str]]:
    """``NAME=PATH`` or ``PATH`` (named after its method) -> [(name, path)], names unique."""
    out: list[tuple[str, str]] = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = "", item
        elif not name or not path:
            raise FmlmError(f"--ckpt expects NAME=PATH or PATH, got {item!r}")
        out.append((name, path))
    return out


def load_models(items: list[str], device: str | None = None) -> list[Served]:
    from fmlm.api import load

    served: list[Served] = []
    for name, path in parse_ckpt_args(items):
        model = load(path, device=device or "cpu")
        name = name or model.config.train.method
        if any(s.name == name for s in served):
            raise FmlmError(f"two models are named {name!r}; name them with --ckpt NAME=PATH")
        served.append(wrap_model(name, model))
    if not served:
        raise FmlmError("fmlm serve needs at least one --ckpt")
    return served


# --------------------------------------------------------------------------- validation
def _int_field(body: dict, key: str, default: int, lo: int, hi: int, what: str = "") -> int:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise BadRequest(f"{key} must be an integer, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise BadRequest(f"{key} must be in {lo}..{hi}{what}, got {v}")
    return v


@dataclass
class Job:
    """One validated request on its way through the queue."""

    served: Served
    num_samples: int
    steps: int
    seed: int
    seq_len: int
    options: dict
    stream: bool = False
    max_events: int = 64
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = 0.0


def json_depth(raw: bytes, limit: int) -> None:
    """Raise BadRequest if arrays/objects nest deeper than ``limit`` (before the recursive parser
    sees them: 8,000 nested brackets fit in 16 KB and overflow Python's recursion)."""
    depth, in_string, escaped = 0, False, False
    for b in raw:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # quote
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                raise BadRequest(f"request body nests deeper than {limit} levels")
        elif b in (0x5D, 0x7D):
            depth -= 1


def parse_json(raw: bytes, limits: ServeLimits) -> Any:
    """``json.loads`` with limits on nesting and number length, and no NaN/Infinity."""
    json_depth(raw, limits.max_json_depth)
    n = limits.max_number_chars

    def number(kind):
        def parse(text: str):
            if len(text) > n:
                raise BadRequest(f"a number in the request body has {len(text)} characters; the limit is {n}")
            v = kind(text)
            if isinstance(v, float) and not math.isfinite(v):
                raise BadRequest(f"number out of range in the request body: {text}")
            return v
        return parse

    def constant(name: str):
        raise BadRequest(f"request body is not valid JSON: {name} is not a number")

    try:
        return json.loads(raw, parse_int=number(int), parse_float=number(float), parse_constant=constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    except (ValueError, RecursionError) as e:  # belt and braces: nothing malformed may become a 500
        raise BadRequest(f"request body is not valid JSON: {type(e).__name__}") from None


def parse_request(raw: bytes, models: dict[str, Served], limits: ServeLimits, stream: bool) -> Job:
    """Validate a request body; raises :class:`BadRequest` with the message for the client."""
    if len(raw) > limits.max_body_bytes:
        raise BadRequest(f"request body is {len(raw)} bytes; the limit is {limits.max_body_bytes}", 413)
    body: Any = {} if not raw.strip() else parse_json(raw, limits)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(_FIELDS))}")
    name = body.get("model")
    if name is None:
        served = next(iter(models.values()))
    elif not isinstance(name, str) or name not in models:
        raise BadRequest(f"unknown model {json.dumps(name)[:60]}; served: {', '.join(models)}", 404)
    else:
        served = models[name]
    max_samples = 1 if stream else limits.max_samples
    num_samples = _int_field(body, "num_samples", 1, 1, max_samples, " (streams show one sample)" if stream else "")
    steps = _int_field(body, "steps", min(served.model.config.sample.steps, limits.max_steps), 1, limits.max_steps)
    seed = _int_field(body, "seed", 0, 0, 2**63 - 1)
    seq_len = _int_field(body, "seq_len", served.model.config.data.seq_len, 1, served.max_seq_len,
                         f" (model {served.name!r})")
    max_events = _int_field(body, "max_events", limits.max_events, 1, limits.max_events)
    options: dict[str, Any] = {}
    gamma = body.get("gamma")
    if gamma is not None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma < 1.0:
            raise BadRequest(f"gamma must be a number in [0, 1), got {json.dumps(gamma)[:40]}")
        if gamma > 0 and "gamma" not in inspect.signature(served.model.method.sample).parameters:
            raise BadRequest(f"gamma does not apply to model {served.name!r} (method {served.method})")
        options["gamma"] = float(gamma)
    for key in CONDITIONING_FIELDS:
        v = body.get(key)
        if v is None or v == "":
            continue
        if not isinstance(v, str):
            raise BadRequest(f"{key} must be a string")
        if len(v) > limits.max_text_chars:
            raise BadRequest(f"{key} has {len(v)} characters; the limit is {limits.max_text_chars}", 413)
        if key not in served.conditioning:
            takes = f"; it takes {', '.join(served.conditioning)}" if served.conditioning else ""
            raise BadRequest(f"{key} does not apply to model {served.name!r} (method {served.method}{takes})")
        options[key] = v
    if "infill" in options and len(options) > 1 + ("gamma" in options):
        raise BadRequest("give either infill or prefix/suffix, not both")
    cond = {k: v for k, v in options.items() if k in CONDITIONING_FIELDS}
    check = getattr(served.model, "check_conditioning", None)
    if cond and check is not None:
        try:  # tokenising is cheap: a bad text is a 400 before a stream starts
            check(seq_len, **cond)
        except FmlmError as e:
            raise BadRequest(str(e)) from None
    return Job(served, num_samples, steps, seed, seq_len, options, stream=stream, max_events=max_events)


# --------------------------------------------------------------------------- the worker
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
            raise BadRequest(f"server busy: {self.limits.max_queue} requests are already waiting; retry later",
                             503) from None

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
                    self._emit(job, "step", {"step": i + 1, "of": total, "ids": ids,
                                             "tokens": [model.tokenizer.decode([t]) for t in ids],
                                             "confidence": [round(c, 4) for c in conf],
                                             "seconds": time.perf_counter() - started})
                elif method == "ar":
                    snapshot(method, state, i, z, d)  # AR keeps every drawn token's probability

            kw["callback"] = callback
        else:
            def callback(i, z, d):  # the client of a JSON request may go away too
                if job.cancelled.is_set():
                    raise _Cancelled()

            kw["callback"] = callback
        ids = model.sample_ids(job.num_samples, job.steps, job.seed, seq_len=job.seq_len, **kw)
        seconds = time.perf_counter() - started
        out = {"model": job.served.name, "method": job.served.method, "steps": job.steps, "seed": job.seed,
               "num_samples": job.num_samples, "seq_len": job.seq_len, "texts": model.decode(ids),
               "ids": ids.tolist(), "seconds": seconds, "queue_seconds": queue_seconds}
        if job.stream:
            out["tokens"] = [model.tokenizer.decode([t]) for t in out["ids"][0]]
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


# --------------------------------------------------------------------------- the app
def _page() -> str:
    return resources.files("fmlm").joinpath("web/index.html").read_text(encoding="utf-8")


def create_app(models: list[Served], limits: ServeLimits | None = None, threads: int = 1, docs: bool = False):
    """The ASGI application (FastAPI). The worker thread starts and stops with the app.

    ``docs``: also serve the OpenAPI schema (``/openapi.json``) and ``/docs``."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    except ImportError:
        raise FmlmError("fmlm serve needs the serve extra: pip install 'fmlm[serve]'") from None
    from contextlib import asynccontextmanager

    limits = limits or ServeLimits()
    by_name = {s.name: s for s in models}
    worker = Worker(limits, threads)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="fmlm", lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.worker = worker

    def error(e: BadRequest) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)

    async def read_job(request: Request, stream: bool) -> Job:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            raise BadRequest(f"request body is {size} bytes; the limit is {limits.max_body_bytes}", 413)
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise BadRequest(f"request body exceeds {limits.max_body_bytes} bytes", 413)
        job = parse_request(raw, by_name, limits, stream)
        job.loop = asyncio.get_running_loop()
        return job

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": {s.name: s.info() for s in models},
                "queue": {"waiting": worker.queue.qsize(), "max": limits.max_queue, "busy": worker.busy},
                "served_requests": worker.served_requests, "dropped_requests": worker.dropped_requests,
                "limits": {"max_steps": limits.max_steps, "max_samples": limits.max_samples,
                           "max_body_bytes": limits.max_body_bytes, "max_text_chars": limits.max_text_chars}}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_page())

    @app.post("/v1/generate")
    async def generate(request: Request):
        try:
            job = await read_job(request, stream=False)
            job.future = job.loop.create_future()
            worker.submit(job)
        except BadRequest as e:
            return error(e)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not job.future.done():  # the client left (or the server is stopping): drop the work
                job.cancelled.set()
            gone.cancel()
        if not job.future.done():
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        kind, data = job.future.result()
        if kind == "error":
            return JSONResponse({"error": data["error"]}, status_code=data["status"])
        return data

    @app.post("/v1/stream")
    async def stream(request: Request):
        try:
            job = await read_job(request, stream=True)
            job.events = asyncio.Queue()
            worker.submit(job)
        except BadRequest as e:
            return error(e)

        async def events():
            try:
                while True:
                    kind, data = await job.events.get()
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                    if kind in ("done", "error"):
                        return
            finally:
                job.cancelled.set()  # the client left early: stop sampling at the next step

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.exception_handler(404)
    async def not_found(request, exc):
        return JSONResponse({"error": f"no such endpoint: {request.method} {request.url.path}"}, status_code=404)

    @app.exception_handler(405)
    async def bad_method(request, exc):
        return JSONResponse({"error": f"method {request.method} is not allowed on {request.url.path}"},
                            status_code=405)

    return app


async def _disconnected(request) -> None:
    """Returns when the client of ``request`` (whose body has been read) disconnects."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); every failure is one line (FmlmError)."""
    if not 0 <= port <= 65535:
        raise FmlmError(f"port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise FmlmError(f"cannot listen on {host}:{port}: unknown host ({e})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        why = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise FmlmError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def serve(ckpts: list[str], host: str = "127.0.0.1", port: int = 8000, threads: int = 1,
          limits: ServeLimits | None = None, device: str | None = None, log_level: str = "info",
          docs: bool = False) -> None:
    """Load the models and serve them until interrupted (``fmlm serve``).

    The socket is bound before the models are loaded, so a port in use or a bad host is one
    line at once; binding beyond loopback prints a warning (there is no authentication).
    """
    try:
        import uvicorn
    except ImportError:
        raise FmlmError("fmlm serve needs the serve extra: pip install 'fmlm[serve]'") from None
    import torch

    sock = bind_socket(host, port)
    try:
        if not is_loopback(host):
            sys.stderr.write(f"fmlm serve: warning: listening on {host}:{port}, beyond this machine; the API has "
                             "no authentication, so anyone who can reach this address can use it\n")
        torch.set_num_threads(threads)
        models = load_models(ckpts, device)
        app = create_app(models, limits, threads, docs=docs)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        server.run(sockets=[sock])
    finally:
        sock.close()
