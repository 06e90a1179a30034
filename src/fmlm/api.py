"""Python API: ``fmlm.load(path).sample(num_samples, steps, seed)``."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from fmlm import checkpoint as ckpt
from fmlm.config import RunConfig
from fmlm.errors import CheckpointError, FmlmError
from fmlm.methods import build_method
from fmlm.train import pick_device


class Model:
    """A trained model with its tokenizer, ready to sample.

    Attributes:
        config: the resolved :class:`RunConfig` saved with the checkpoint.
        method: the method module (e.g. :class:`fmlm.methods.FLM`), in eval mode.
        tokenizer: the tokenizer saved with the checkpoint.
        path: the checkpoint directory.
    """

    def __init__(self, config: RunConfig, method: torch.nn.Module, tokenizer, path: Path):
        self.config = config
        self.method = method
        self.tokenizer = tokenizer
        self.path = path
        self._task = None

    @property
    def device(self) -> torch.device:
        return next(self.method.parameters()).device

    @property
    def task(self):
        """The synthetic PhrasesTask the model was trained on (None for real text)."""
        if self._task is None and self.config.data.dataset == "phrases":
            from fmlm.data import PhrasesTask

            d = self.config.data
            self._task = PhrasesTask(n=d.phrases_n, k=d.phrases_k, phrases_per_seq=d.phrases_per_seq,
                                     vocab_size=d.phrases_vocab or None, seed=d.seed)
        return self._task

    @torch.no_grad()
    def sample_ids(self, num_samples: int = 4, steps: int | None = None, seed: int = 0,
                   seq_len: int | None = None, float64: bool = False, batch_size: int = 256,
                   **options) -> torch.Tensor:
        """Token ids (num_samples, seq_len). The same seed gives the same ids.

        ``options`` go to the method's sampler when it has them, e.g. ``gamma`` (flow-map
        re-noising) or ``temperature``, ``top_k``, ``top_p`` (AR). ``None`` values are
        dropped; an option the method does not take is an error.
        """
        steps = self.config.sample.steps if steps is None else steps
        seq_len = self.config.data.seq_len if seq_len is None else seq_len
        if steps < 1:
            raise FmlmError(f"steps must be >= 1, got {steps}")
        if num_samples < 1:
            raise FmlmError(f"num_samples must be >= 1, got {num_samples}")
        if seq_len < 1 or seq_len > self.config.model.max_seq_len:
            raise FmlmError(f"sequence length {seq_len} is outside 1..{self.config.model.max_seq_len}, "
                            "the model's maximum")
        # None means "not given"; gamma = 0 is the deterministic sampler every method has.
        extra = {k: v for k, v in options.items() if v is not None and not (k == "gamma" and v == 0)}
        accepted = inspect.signature(self.method.sample).parameters
        for k in extra:
            if k not in accepted:
                raise FmlmError(f"sampling option {k!r} does not apply to method {self.config.train.method!r}")
        if not 0.0 <= extra.get("gamma", 0.0) < 1.0:
            raise FmlmError(f"gamma must be in [0, 1), got {extra['gamma']}")
        gen = torch.Generator(self.device).manual_seed(seed)
        out = []
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            try:
                out.append(self.method.sample(n, seq_len, steps, generator=gen, float64=float64, **extra).cpu())
            except ValueError as e:  # samplers validate their options with ValueError
                raise FmlmError(str(e)) from None
        return torch.cat(out)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(row.tolist()) for row in ids]

    def sample(self, num_samples: int = 4, steps: int | None = None, seed: int = 0, **kw) -> list[str]:
        """Sample ``num_samples`` texts with ``steps`` network evaluations."""
        return self.decode(self.sample_ids(num_samples, steps, seed, **kw))


def load(path: str | Path, device: str | torch.device | None = None, ema: bool = True,
         tokenizer=None) -> Model:
    """Load a checkpoint directory or a run directory (its newest checkpoint).

    Loading is strict: a missing or corrupt file, a weight of the wrong shape or a
    tokenizer whose vocabulary differs from the model's raises
    :class:`fmlm.errors.CheckpointError`.

    Args:
        path: checkpoint directory or run directory.
        device: defaults to the best available (cuda, mps, cpu).
        ema: use the EMA weights when the checkpoint has them.
        tokenizer: optional replacement tokenizer (must have the model's vocabulary size).
    """
    from fmlm.data import load_tokenizer

    p = ckpt.resolve(path)
    ckpt.verify(p, deep=True)
    cfg = RunConfig.from_dict(ckpt.read_json(p / "config.json"))
    tok = tokenizer if tokenizer is not None else load_tokenizer(p / "tokenizer")
    if tok.vocab_size != cfg.model.vocab_size:
        raise CheckpointError(f"tokenizer vocabulary ({tok.vocab_size}) does not match the checkpoint's "
                              f"({cfg.model.vocab_size})")
    method = build_method(cfg)
    name = "ema.safetensors" if ema and (p / "ema.safetensors").is_file() else "model.safetensors"
    ckpt.load_into(method, ckpt.load_state(p, name), f"{p / name}")
    dev = pick_device("auto") if device is None else torch.device(device)
    method.to(dev).eval()
    return Model(cfg, method, tok, p)
