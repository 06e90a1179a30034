"""The OpenAI-compatible endpoints: ``POST /v1/completions`` and ``GET /v1/models``.

A completion request (``model``, ``prompt``, ``max_tokens``, ``n``, ``seed``, ``stream``,
``stream_options``; fmlm's ``steps`` and ``gamma`` as extra fields) samples the model's whole
training block (``data.seq_len`` tokens) with the prompt's tokens as a known prefix, and
answers the tokens after the prompt, up to the first EOS (``finish_reason`` "stop") and at most
``max_tokens`` of them ("length"). ``max_tokens`` defaults to the rest of the block; a prompt
that leaves no room is a 400. ``prompt`` is a string or a list of strings (``n`` choices each,
indexed prompt-major); ``seed`` defaults to a fresh random one, returned in the answer.
Sampling parameters that fmlm does not implement (``temperature``, ``top_p``, ``stop``,
``logprobs``, ``echo``, penalties, ``logit_bias``, ``best_of``, ``suffix``) are accepted at their
neutral values and refused otherwise. Errors use OpenAI's format,
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

With ``stream: true`` the answer is server-sent events in OpenAI's format: a block is sampled
all at once, so each choice comes as one ``text_completion`` chunk holding its whole text and
its ``finish_reason`` once the batch is done (with ``stream_options.include_usage``, a last
chunk with the usage and no choices), then ``data: [DONE]``.

Requests for the same model, ``steps``, ``gamma`` (and, for AR, the same prompt) share batched
forward passes (:mod:`fmlm.serve.batching`); the prompts of a batch may differ.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import torch

from fmlm import length
from fmlm.errors import FmlmError
from fmlm.guidance import encode_text
from fmlm.serve.models import Served
from fmlm.serve.requests import BadRequest, Job, ServeLimits, _int_field, parse_gamma, parse_json, pick_model

#: Fields fmlm does not implement, accepted at these (OpenAI's neutral) values only.
_NEUTRAL: dict[str, tuple] = {
    "temperature": (1,),
    "top_p": (1,),
    "echo": (False,),
    "logprobs": (None,),
    "stop": (None, [], ""),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
}
_FIELDS = {"model", "prompt", "max_tokens", "n", "seed", "stream", "stream_options", "steps", "gamma", "user"}


def openai_error(e: BadRequest) -> tuple[dict, int]:
    """The body and status of an error in OpenAI's format."""
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}}, e.status


def model_list(models: list[Served]) -> dict:
    return {"object": "list", "data": [model_card(s) for s in models]}


def model_card(s: Served) -> dict:
    try:
        created = int(s.model.path.stat().st_mtime)
    except (OSError, AttributeError):
        created = 0
    return {"id": s.name, "object": "model", "created": created, "owned_by": "fmlm", **s.info()}


def _is_neutral(v, values: tuple) -> bool:
    """Whether ``v`` is one of ``values`` (True is not 1, 1.0 is 1)."""
    for o in values:
        if o is None or isinstance(o, bool):
            if v is o:
                return True
        elif isinstance(o, (int, float)):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == o:
                return True
        elif type(v) is type(o) and v == o:
            return True
    return False


def _prompts(body: dict) -> list[str]:
    p = body.get("prompt")
    if p is None:
        return [""]
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return p
    if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        raise BadRequest("prompt as token ids is not supported; send the text", param="prompt")
    raise BadRequest("prompt must be a string or a non-empty list of strings", param="prompt")


def parse_completion(raw: bytes, models: dict[str, Served], limits: ServeLimits) -> Job:
    """Validate a /v1/completions body into a :class:`Job` whose ``finish`` builds the answer."""
    if len(raw) > limits.max_body_bytes:
        raise BadRequest(f"request body is {len(raw)} bytes; the limit is {limits.max_body_bytes}", 413)
    body: Any = {} if not raw.strip() else parse_json(raw, limits)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS - set(_NEUTRAL))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}", param=unknown[0])
    for key, ok in _NEUTRAL.items():
        if key in body and not _is_neutral(body[key], ok):
            raise BadRequest(f"{key} is not supported by fmlm (only {json.dumps(ok[0])})", param=key)
    served = pick_model(body.get("model"), models, required=True)
    model, L = served.model, served.model.config.data.seq_len
    prompts = _prompts(body)
    if sum(len(p) for p in prompts) > limits.max_text_chars:
        raise BadRequest(f"the prompt has more than {limits.max_text_chars} characters", 413, "prompt")
    try:
        ids = [encode_text(p, model.tokenizer) if p else [] for p in prompts]
    except FmlmError as e:
        raise BadRequest(str(e), param="prompt") from None
    longest = max(len(x) for x in ids)
    if longest >= L:
        raise BadRequest(
            f"the prompt is {longest} tokens; model {served.name!r} samples blocks of {L} tokens, "
            "so no room is left for a completion",
            param="prompt",
        )
    max_tokens = _int_field(body, "max_tokens", L - longest, 1, L - longest, f" (a block of {L} less the prompt)")
    n = _int_field(body, "n", 1, 1, limits.max_samples)
    rows = n * len(prompts)
    if rows > limits.max_samples:
        raise BadRequest(f"n x prompts is {rows}; the limit is {limits.max_samples}", param="n")
    seed = secrets.randbits(63) if body.get("seed") is None else _int_field(body, "seed", 0, 0, 2**63 - 1)
    steps = _int_field(body, "steps", min(model.config.sample.steps, limits.max_steps), 1, limits.max_steps)
    gamma = parse_gamma(body, served) or 0.0
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", param="stream")
    opts = body.get("stream_options") or {}
    if (
        not isinstance(opts, dict)
        or set(opts) - {"include_usage"}
        or not isinstance(opts.get("include_usage", False), bool)
    ):
        raise BadRequest('stream_options must be {"include_usage": true|false}', param="stream_options")
    job = Job(served, rows, steps, seed, L, {"gamma": gamma} if gamma else {})
    prompted, shared = longest > 0, None
    if prompted and "infill" in served.conditioning:  # any known positions: each row its own prompt
        job.known = torch.zeros(rows, L, dtype=torch.long)
        job.mask = torch.zeros(rows, L, dtype=torch.bool)
        for r in range(rows):
            p = ids[r // n]
            job.known[r, : len(p)] = torch.tensor(p, dtype=torch.long)
            job.mask[r, : len(p)] = True
    elif prompted and "prefix" in served.conditioning:  # a prefix shared by the whole batch (AR)
        if any(x != ids[0] for x in ids):
            raise BadRequest(
                f"model {served.name!r} (method {served.method}) takes one prompt per request", param="prompt"
            )
        shared = tuple(ids[0])
        job.known = list(shared)
    elif prompted:
        raise BadRequest(f"a prompt does not apply to model {served.name!r} (method {served.method})", param="prompt")
    job.batch_key = ("completion", served.name, steps, L, gamma, prompted, shared)
    job.finish = _answer(served, [len(x) for x in ids], n, max_tokens, stream, bool(opts.get("include_usage")))
    return job


def _answer(served: Served, prompt_lens: list[int], n: int, max_tokens: int, stream: bool, usage_chunk: bool):
    """The function that turns a completion job's raw blocks (rows, L) into its answer (dict or SSE chunks)."""
    tok = served.model.tokenizer
    eos, sep = length.eos_id_of(tok), served.info()["separator"]

    def finish(job: Job, raw: torch.Tensor, meta: dict):
        choices, used = [], 0
        for r in range(raw.shape[0]):
            p = prompt_lens[r // n]
            (row,), (ended,) = length.split_at_eos(raw[r : r + 1], eos, p)
            stop = ended and len(row) <= max_tokens
            row = row[:max_tokens]
            text = tok.decode(row)
            if p and text and sep and not text.startswith(sep):
                text = sep + text  # word-level tokens: prompt + text reads as one text
            used += len(row)
            choices.append({"index": r, "text": text, "logprobs": None, "finish_reason": "stop" if stop else "length"})
        usage = {"prompt_tokens": sum(prompt_lens), "completion_tokens": used, "total_tokens": sum(prompt_lens) + used}
        head = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time())}
        head.update(model=served.name, system_fingerprint=None)
        extra = {"seed": job.seed, "steps": job.steps, "fmlm": {"method": served.method, **meta}}
        if not stream:
            return {**head, "choices": choices, "usage": usage, **extra}
        chunks = [{**head, "choices": [c], **extra} for c in choices]
        if usage_chunk:
            chunks.append({**head, "choices": [], "usage": usage})
        return {"sse": "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"}

    return finish
