"""The models a server holds: each checkpoint loaded once, with its name and text separator."""

from dataclasses import dataclass
from typing import Any

from fmlm.errors import FmlmError

#: Request fields passed through to the sampler when the model API accepts them.
CONDITIONING_FIELDS = ("prefix", "suffix", "infill")


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
        return {
            "method": self.method,
            "vocab_size": cfg.model.vocab_size,
            "seq_len": cfg.data.seq_len,
            "max_seq_len": self.max_seq_len,
            "default_steps": cfg.sample.steps,
            "conditioning": list(self.conditioning),
            "checkpoint": self.model.path.name,
            "separator": _separator(self.model.tokenizer),
        }


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
