"""What a request may ask for: the server's limits, strict JSON parsing, and a request turned into a :class:`Job`."""

import asyncio
import inspect
import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any

from fmlm.errors import FmlmError
from fmlm.serve.models import CONDITIONING_FIELDS, Served

_FIELDS = {
    "model",
    "num_samples",
    "steps",
    "seed",
    "seq_len",
    "gamma",
    "max_events",
    "min_length",
    "length",
    "context",
    "bos",
    "cfg_weight",
    *CONDITIONING_FIELDS,
}


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
    max_tries: int = 4  # draws per sample for min_length (fmlm.length)
    max_length: int = 4_096  # tokens of a long text, written block by block (fmlm.long)
    batch_max: int = 32  # sequences in one batched forward pass (1: no batching)
    batch_window: float = 0.0  # seconds a batch waits for more requests (0: only those already waiting)


class BadRequest(Exception):
    """A client error: HTTP ``status`` with a one-line message."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param  # the request field at fault (the OpenAI error format names it)
        self.code = code


def _int_field(body: dict, key: str, default: int, lo: int, hi: int, what: str = "") -> int:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise BadRequest(f"{key} must be an integer, got {json.dumps(v)[:40]}", param=key)
    if not lo <= v <= hi:
        raise BadRequest(f"{key} must be in {lo}..{hi}{what}, got {v}", param=key)
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
    # Batching (fmlm.serve.batching): jobs with equal keys share one forward pass. ``known`` and
    # ``mask`` are per-row conditioning (num_samples, L) that batches concatenate; ``finish`` turns
    # the job's raw blocks into its answer (None: the /v1/generate answer).
    batch_key: tuple | None = None
    known: Any = None
    mask: Any = None
    finish: Any = None


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


def pick_model(name, models: dict[str, Served], required: bool = False) -> Served:
    """The served model called ``name`` (the first one when None and not ``required``)."""
    if name is None:
        if required:
            raise BadRequest("model is required; served: " + ", ".join(models), param="model")
        return next(iter(models.values()))
    if not isinstance(name, str) or name not in models:
        raise BadRequest(
            f"unknown model {json.dumps(name)[:60]}; served: {', '.join(models)}", 404, "model", "model_not_found"
        )
    return models[name]


def parse_gamma(body: dict, served: Served) -> float | None:
    """The request's ``gamma`` (None when absent), checked against the model's sampler."""
    gamma = body.get("gamma")
    if gamma is None:
        return None
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma < 1.0:
        raise BadRequest(f"gamma must be a number in [0, 1), got {json.dumps(gamma)[:40]}", param="gamma")
    if gamma > 0 and "gamma" not in inspect.signature(served.model.method.sample).parameters:
        raise BadRequest(f"gamma does not apply to model {served.name!r} (method {served.method})", param="gamma")
    return float(gamma)


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
    served = pick_model(body.get("model"), models)
    max_samples = 1 if stream else limits.max_samples
    num_samples = _int_field(body, "num_samples", 1, 1, max_samples, " (streams show one sample)" if stream else "")
    steps = _int_field(body, "steps", min(served.model.config.sample.steps, limits.max_steps), 1, limits.max_steps)
    seed = _int_field(body, "seed", 0, 0, 2**63 - 1)
    seq_len = _int_field(
        body, "seq_len", served.model.config.data.seq_len, 1, served.max_seq_len, f" (model {served.name!r})"
    )
    max_events = _int_field(body, "max_events", limits.max_events, 1, limits.max_events)
    options: dict[str, Any] = {}
    bos = body.get("bos", False)
    if not isinstance(bos, bool):
        raise BadRequest(f"bos must be true or false, got {json.dumps(bos)[:40]}")
    total = _int_field(body, "length", 0, 0, limits.max_length, " (tokens of a text written block by block)")
    if total:
        if stream:
            raise BadRequest("length (a long text, block by block) is for /v1/generate, not a stream", param="length")
        options["length"] = total
        if "context" in body:
            options["context"] = _int_field(body, "context", 0, 0, seq_len - 1, " (less than the block)")
    elif "context" in body:
        raise BadRequest("context applies only with a length", param="context")
    room = " (the length)" if total else " (the sequence length" + (", less one for bos)" if bos else ")")
    min_length = _int_field(body, "min_length", 0, 0, total or seq_len - bos, room)
    if min_length:
        options["min_length"] = min_length
    if bos:
        options["bos"] = True
    gamma = parse_gamma(body, served)
    if gamma is not None:
        options["gamma"] = gamma
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
    if "infill" in options and any(k in options for k in ("prefix", "suffix")):
        raise BadRequest("give either infill or prefix/suffix, not both")
    _cfg_weight(body, served, options)
    cond = {k: v for k, v in options.items() if k in (*CONDITIONING_FIELDS, "bos")}
    check = getattr(served.model, "check_conditioning", None)
    if cond and check is not None:
        try:  # tokenising is cheap: a bad text is a 400 before a stream starts
            check(seq_len, **cond)
        except FmlmError as e:
            raise BadRequest(str(e)) from None
    job = Job(served, num_samples, steps, seed, seq_len, options, stream=stream, max_events=max_events)
    if not stream and not min_length and not total:  # one draw: requests with the same settings can share it
        job.batch_key = ("generate", served.name, steps, seq_len, tuple(sorted(options.items())))
    return job


def _cfg_weight(body: dict, served: Served, options: dict) -> None:
    """``cfg_weight``: classifier-free guidance of a prefix/suffix/infill (models trained with conditioning)."""
    w = body.get("cfg_weight")
    if w is None:
        return
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or abs(w) > 1e6:
        raise BadRequest(f"cfg_weight must be a finite number, got {json.dumps(w)[:40]}")
    if "cfg_weight" not in inspect.signature(served.model.method.sample).parameters:
        raise BadRequest(f"cfg_weight does not apply to model {served.name!r} (method {served.method})")
    if getattr(served.model.method.net, "given_embed", None) is None:
        raise BadRequest(f"cfg_weight needs a model trained with conditioning; {served.name!r} was not")
    if not any(k in options for k in CONDITIONING_FIELDS):
        raise BadRequest("cfg_weight needs a prefix, suffix or infill")
    options["cfg_weight"] = float(w)
