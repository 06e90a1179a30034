"""The model card (``README.md``) of a Hugging Face-style model directory: YAML front matter the Hub
reads (``library_name: fmlm``, tags, datasets, pipeline tag) and a body with the method, the
resolved config, where the weights came from and the evaluation table when there is one.

The front matter is written and read here without a YAML library: it holds only ``key: value``
lines and lists of ``- item`` lines, and :func:`front_matter` reads exactly that subset.
"""

from __future__ import annotations

import json
from typing import Any

LIBRARY = "fmlm"

#: What each method is, in one line (the card's first paragraph).
METHOD_TEXT = {
    "flm": "a flow-based language model (FLM): continuous denoising of one-hot tokens with a bidirectional "
    "transformer, sampled with Euler steps of the learned flow",
    "semigroup": "a flow map language model (FMLM, semigroup distillation): a two-time denoiser that jumps "
    "along the flow of an FLM, so one or a few steps generate text",
    "lagrangian": "a flow map language model (FMLM, Lagrangian distillation): a two-time denoiser that jumps "
    "along the flow of an FLM, so one or a few steps generate text",
    "eulerian": "a flow map language model (FMLM, Eulerian distillation): a two-time denoiser that jumps "
    "along the flow of an FLM, so one or a few steps generate text",
    "mdlm": "a masked diffusion language model (MDLM baseline)",
    "duo": "a uniform-state discrete diffusion language model (Duo baseline)",
    "dcd": "a Duo model distilled with discrete consistency distillation (DCD baseline)",
    "sdtt": "an MDLM distilled with self-distillation through time (SDTT baseline)",
    "ar": "an autoregressive transformer language model (AR baseline)",
    "classifier": "a reward classifier over soft token sequences (for reward guidance of FLM/FMLM sampling)",
}

_METHOD_TAGS = {
    "flm": ["flow-language-model", "flow-matching"],
    "semigroup": ["flow-map-language-model", "flow-map", "few-step"],
    "lagrangian": ["flow-map-language-model", "flow-map", "few-step"],
    "eulerian": ["flow-map-language-model", "flow-map", "few-step"],
    "mdlm": ["masked-diffusion", "discrete-diffusion"],
    "duo": ["uniform-diffusion", "discrete-diffusion"],
    "dcd": ["uniform-diffusion", "discrete-diffusion", "distillation"],
    "sdtt": ["masked-diffusion", "discrete-diffusion", "distillation"],
    "ar": ["autoregressive"],
    "classifier": ["reward-model"],
}

#: fmlm's named corpora -> their dataset ids on the Hub (the first source fmlm loads them from).
DATASETS = {
    "shakespeare": "karpathy/tiny_shakespeare",
    "lm1b": "lm1b",
    "openwebtext": "Skylion007/openwebtext",
    "wikitext2": "Salesforce/wikitext",
    "wikitext103": "Salesforce/wikitext",
    "tinystories": "roneneldan/TinyStories",
}


def metadata(config: dict[str, Any]) -> dict[str, Any]:
    """The card's front matter for a resolved config (as a dict)."""
    method = config["train"]["method"]
    tags = ["fmlm", *_METHOD_TAGS.get(method, []), "text-generation" if method != "classifier" else "classification"]
    meta: dict[str, Any] = {"library_name": LIBRARY, "tags": tags}
    dataset = DATASETS.get(config["data"]["dataset"])
    if dataset:
        meta["datasets"] = [dataset]
    meta["pipeline_tag"] = "text-generation" if method != "classifier" else "text-classification"
    return meta


def _scalar(v: Any) -> str:
    s = str(v)
    # Quote what YAML would read as something else (a leading symbol, a colon-space, ...).
    if not s or s[0] in "!&*[]{}|>'\"%@`#,?:-" or ": " in s or " #" in s or s.lower() in ("true", "false", "null"):
        return json.dumps(s)
    return s


def render_front_matter(meta: dict[str, Any]) -> str:
    lines = ["---"]
    for k, v in meta.items():
        if isinstance(v, (list, tuple)):
            lines.append(f"{k}:")
            lines += [f"- {_scalar(x)}" for x in v]
        else:
            lines.append(f"{k}: {_scalar(v)}")
    return "\n".join(lines + ["---", ""])


def front_matter(text: str) -> dict[str, Any] | None:
    """The ``key: value`` / ``- item`` front matter of a card, or None when it has none."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    meta: dict[str, Any] = {}
    key = None
    for line in lines[1:]:
        if line.strip() == "---":
            return meta
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.lstrip().startswith("- ") and key is not None:
            if not isinstance(meta.get(key), list):
                meta[key] = []
            meta[key].append(_unquote(line.lstrip()[2:]))
        elif ":" in line and not line[0].isspace():
            key, _, value = line.partition(":")
            key = key.strip()
            meta[key] = _unquote(value) if value.strip() else None
    return None  # no closing ---


def _unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        return json.loads(s) if s[0] == '"' else s[1:-1]
    return s


def _eval_table(result: dict[str, Any]) -> list[str]:
    """Markdown rows of an ``fmlm eval`` result (its ``results``: one row per step count)."""
    rows = result.get("results") or []
    if not rows:
        return []
    cols = [
        ("steps", "steps", "{}"),
        ("gen-PPL", "gen_ppl", "{:.2f}"),
        ("gen bits/byte", "gen_bpb", "{:.3f}"),
        ("entropy", "entropy", "{:.3f}"),
        ("valid rate", "valid_rate", "{:.3f}"),
        ("coverage", "coverage", "{:.3f}"),
        ("ms/sample", "seconds_per_sample", None),
    ]
    cols = [c for c in cols if any(r.get(c[1]) is not None for r in rows)]

    def cell(r, key, fmt):
        v = r.get(key)
        if v is None:
            return "–"
        return f"{v * 1e3:.2f}" if fmt is None else fmt.format(v)

    out = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(r, k, f) for _, k, f in cols) + " |" for r in rows]
    notes = []
    scorer = result.get("scorer")
    if scorer:
        notes.append(f"scorer {scorer.get('name', scorer) if isinstance(scorer, dict) else scorer}")
    for key, what in (("num_samples", "samples"), ("seed", "seed")):
        if result.get(key) is not None:
            notes.append(f"{what} {result[key]}")
    for key, what in (
        ("data_bpb", "held-out text (bits/byte)"),
        ("val_ce", "validation CE"),
        ("val_nll", "validation NLL"),
    ):
        if isinstance(result.get(key), (int, float)):
            notes.append(f"{what} {result[key]:.3f}")
    for key in ("device", "torch", "commit"):
        if result.get(key):
            notes.append(f"{key} {result[key]}")
    if notes:
        out += ["", "Measured with `fmlm eval` (" + ", ".join(notes) + ")."]
    return out


def render(
    config: dict[str, Any],
    *,
    name: str,
    weights: str,
    num_params: int,
    version: str,
    commit: str | None,
    source: dict[str, Any] | None = None,
    eval_result: dict[str, Any] | None = None,
) -> str:
    """The model card: front matter, then what the model is, how to use it, its evaluation and config."""
    m, d = config["model"], config["data"]
    method = config["train"]["method"]
    body = [f"# {name}", "", f"This is {METHOD_TEXT.get(method, f'an fmlm {method} model')}. Made with fmlm."]
    body += [
        "",
        f"- method: `{method}`" + (f" (time `{config['train']['time']}`)" if method in _FLOW else ""),
        f"- backbone: {m['n_layers']} layers, width {m['d_model']}, {m['n_heads']} heads, "
        f"{num_params / 1e6:.2f}M parameters, vocabulary {m['vocab_size']}, blocks of {m['max_seq_len']} tokens",
        f"- data: `{d['dataset']}`, tokenizer `{d['tokenizer']}`, packing `{d['packing']}`",
        f"- weights: {'the EMA weights' if weights == 'ema' else 'the raw (non-EMA) weights'}",
    ]
    if source:
        body.append("- from: " + ", ".join(f"{k} {v}" for k, v in source.items() if v is not None))
    body.append(f"- fmlm {version}" + (f", commit `{commit}`" if commit else ""))
    steps = config["sample"]["steps"]
    body += [
        "",
        "## Use",
        "",
        "```python",
        "import fmlm",
        "",
        f'model = fmlm.from_pretrained("{name}")',
        f"print(model.sample(num_samples=4, steps={steps}, seed=0))" if method != "classifier" else None,
        "```",
        "",
        "The directory is also an fmlm checkpoint: `fmlm sample --ckpt DIR` and `fmlm eval --ckpt DIR` take it.",
    ]
    table = _eval_table(eval_result) if eval_result else []
    if table:
        body += ["", "## Evaluation", "", *table]
    body += ["", "## Configuration", "", "The resolved run configuration (also `config.json`):", "", "```json"]
    body += [json.dumps(config, indent=2), "```", ""]
    return render_front_matter(metadata(config)) + "\n" + "\n".join(line for line in body if line is not None)


_FLOW = ("flm", "semigroup", "lagrangian", "eulerian")
