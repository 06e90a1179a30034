"""``fmlm serve``: an HTTP API and a live web page of the denoising.

Endpoints (JSON in, JSON out; every 4xx carries ``{"error": "<one clear line>"}``):

* ``GET  /health``          status, the served models and the queue depth.
* ``POST /v1/generate``     ``{"model", "num_samples", "steps", "seed", "seq_len", "gamma", "prefix"}``
  (all optional) -> ``{"texts", "ids", "seconds", "queue_seconds", ...}``.
* ``POST /v1/stream``       the same body (one sample); server-sent events ``step`` (the argmax of the
  current denoiser / flow-map prediction and its probability per token, after every network
  evaluation, thinned to at most ``max_events``), then ``done`` (the final text and timings) or ``error``.
* ``POST /v1/completions``  OpenAI's completions API (``model``, ``prompt`` as a known prefix,
  ``max_tokens``, ``n``, ``seed``, ``stream``; fmlm's ``steps`` and ``gamma`` as extra fields),
  with OpenAI's error format; ``GET /v1/models`` lists the models (:mod:`fmlm.serve.completions`).
* ``GET  /``                the web page (FLM many-step and FMLM one-step side by side).

All models run in ONE worker thread (PyTorch, ``threads`` intra-op threads), fed by a bounded
queue: a request that finds the queue full is answered 503 at once, so the server never builds up
unbounded work. Waiting requests for the same model and settings (JSON generate requests without
``min_length``, and completions, whose prompts may differ) are gathered into one batched forward
pass of at most ``batch_max`` sequences, waiting at most ``batch_window`` seconds for more
(:mod:`fmlm.serve.batching`). Each request keeps its own seed's noise, bit for bit, so it gets
the text it gets alone (up to floating-point rounding that a larger batch may bring; equal in the
tests). The event loop only parses, validates and waits.

Conditioning: ``prefix`` (text the sample starts with), ``suffix`` (text it ends with; with or
without a prefix) and ``infill`` (a template such as ``"The [MASK:5] of York"``) go to
:meth:`fmlm.api.Model.sample_ids`. FLM, FMLM, MDLM and Duo take all three, AR only a prefix; a
field the model cannot take is answered 400 "... does not apply to model ...". ``cfg_weight``
(with one of them, on a model trained with ``train.cond_prob`` > 0, FLM or FMLM) is the weight of
classifier-free guidance (:mod:`fmlm.conditioning`).

Hostile input: every malformed body gets a 4xx with one line, never a 500: bodies over
``max_body_bytes`` (413), JSON nested deeper than ``max_json_depth``, numbers longer than
``max_number_chars`` characters, NaN/Infinity, wrong types and ranges (400). A request whose
client disconnects while it waits or runs is dropped (the worker skips it, or stops it at the
next network evaluation). ``/docs`` and ``/openapi.json`` exist only with ``docs=True``
(``fmlm serve --docs``). There is no authentication: bind beyond loopback only on a network you
trust (``fmlm serve`` warns).
"""

from fmlm.serve.app import bind_socket, create_app, is_loopback, serve
from fmlm.serve.batching import JobQueue, RowStreams, Unsplittable
from fmlm.serve.completions import parse_completion
from fmlm.serve.models import CONDITIONING_FIELDS, Served, load_models, parse_ckpt_args, wrap_model
from fmlm.serve.requests import BadRequest, Job, ServeLimits, json_depth, parse_json, parse_request
from fmlm.serve.worker import Worker, snapshot
