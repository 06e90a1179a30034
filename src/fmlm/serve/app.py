"""The HTTP app (FastAPI): the endpoints, the live page, and :func:`serve`, which binds and runs it."""

import asyncio
import errno
import ipaddress
import json
import socket
import sys
from importlib import resources

from fmlm.errors import FmlmError
from fmlm.serve.completions import model_card, model_list, openai_error, parse_completion
from fmlm.serve.models import Served, load_models
from fmlm.serve.requests import BadRequest, Job, ServeLimits, parse_request
from fmlm.serve.worker import Worker


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

    app = FastAPI(
        title="fmlm",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.worker = worker

    def error(e: BadRequest) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)

    async def read_body(request: Request) -> bytes:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            raise BadRequest(f"request body is {size} bytes; the limit is {limits.max_body_bytes}", 413)
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise BadRequest(f"request body exceeds {limits.max_body_bytes} bytes", 413)
        return raw

    async def read_job(request: Request, stream: bool) -> Job:
        job = parse_request(await read_body(request), by_name, limits, stream)
        job.loop = asyncio.get_running_loop()
        return job

    async def run_job(job: Job, request: Request):
        """Submit a JSON job and wait for it: (kind, data), or None when the client left first."""
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        worker.submit(job)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not job.future.done():  # the client left (or the server is stopping): drop the work
                job.cancelled.set()
            gone.cancel()
        return job.future.result() if job.future.done() else None

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "models": {s.name: s.info() for s in models},
            "queue": {"waiting": worker.queue.qsize(), "max": limits.max_queue, "busy": worker.busy},
            "batching": {"max_rows": limits.batch_max, "window_s": limits.batch_window, "batches": worker.batches},
            "served_requests": worker.served_requests,
            "dropped_requests": worker.dropped_requests,
            "limits": {
                "max_steps": limits.max_steps,
                "max_samples": limits.max_samples,
                "max_body_bytes": limits.max_body_bytes,
                "max_text_chars": limits.max_text_chars,
            },
        }

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_page())

    @app.post("/v1/generate")
    async def generate(request: Request):
        try:
            result = await run_job(await read_job(request, stream=False), request)
        except BadRequest as e:
            return error(e)
        if result is None:
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        kind, data = result
        if kind == "error":
            return JSONResponse({"error": data["error"]}, status_code=data["status"])
        return data

    def openai_error_response(e: BadRequest) -> JSONResponse:
        body, status = openai_error(e)
        return JSONResponse(body, status_code=status, headers={"Retry-After": "1"} if status == 503 else None)

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            result = await run_job(parse_completion(await read_body(request), by_name, limits), request)
        except BadRequest as e:
            return openai_error_response(e)
        if result is None:
            return openai_error_response(BadRequest("client disconnected", 499))
        kind, data = result
        if kind == "error":
            return openai_error_response(BadRequest(data["error"], data["status"]))
        if "sse" in data:
            return StreamingResponse(
                iter([data["sse"]]), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return data

    @app.get("/v1/models")
    async def list_models():
        return model_list(models)

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        if name not in by_name:
            return openai_error_response(BadRequest(f"unknown model {name!r}", 404, "model", "model_not_found"))
        return model_card(by_name[name])

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

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.exception_handler(404)
    async def not_found(request, exc):
        return JSONResponse({"error": f"no such endpoint: {request.method} {request.url.path}"}, status_code=404)

    @app.exception_handler(405)
    async def bad_method(request, exc):
        return JSONResponse({"error": f"method {request.method} is not allowed on {request.url.path}"}, status_code=405)

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


def serve(
    ckpts: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    threads: int = 1,
    limits: ServeLimits | None = None,
    device: str | None = None,
    log_level: str = "info",
    docs: bool = False,
) -> None:
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
            sys.stderr.write(
                f"fmlm serve: warning: listening on {host}:{port}, beyond this machine; the API has "
                "no authentication, so anyone who can reach this address can use it\n"
            )
        torch.set_num_threads(threads)
        models = load_models(ckpts, device)
        app = create_app(models, limits, threads, docs=docs)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        server.run(sockets=[sock])
    finally:
        sock.close()
