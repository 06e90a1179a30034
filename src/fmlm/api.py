"""Python API: ``fmlm.load(path).sample(num_samples, steps, seed)``."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from fmlm import length, long
from fmlm.config import RunConfig
from fmlm.errors import FmlmError
from fmlm.length import Samples, check_length_options
from fmlm.length import generate as generate_samples
from fmlm.methods.registry import load_method
from fmlm.runtime import pick_device


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
        self.weights = "ema"  # which weights the method holds: "ema" or "raw" (set by load)
        self._task = None

    @property
    def device(self) -> torch.device:
        return next(self.method.parameters()).device

    @property
    def task(self):
        """The synthetic PhrasesTask the model was trained on (None for real text)."""
        if self._task is None and self.config.data.dataset == "phrases":
            from fmlm.data import PhrasesTask

            self._task = PhrasesTask.from_config(self.config.data)
        return self._task

    @property
    def conditioning(self) -> tuple[str, ...]:
        """Which of ``prefix``, ``suffix`` and ``infill`` this model's sampler can condition on
        (every sampler that takes known tokens; an autoregressive one only a prefix)."""
        sample = getattr(self.method, "sample", None)
        if sample is None or "known" not in inspect.signature(sample).parameters:
            return ()
        if self.config.train.method == "ar" or "mask" not in inspect.signature(sample).parameters:
            return ("prefix",)
        return ("prefix", "suffix", "infill")

    @torch.no_grad()
    def sample_ids(
        self,
        num_samples: int = 4,
        steps: int | None = None,
        seed: int = 0,
        seq_len: int | None = None,
        float64: bool = False,
        batch_size: int = 256,
        **options,
    ) -> torch.Tensor:
        """The raw blocks: token ids (num_samples, seq_len), EOS and what follows it included (use
        :meth:`generate` or :meth:`sample` for samples cut at EOS). The same seed gives the same ids.

        ``options`` go to the method's sampler when it has them, e.g. ``gamma`` (flow-map
        re-noising) or ``temperature``, ``top_k``, ``top_p`` (AR). ``None`` values are
        dropped; an option the method does not take is an error.

        Conditioning and guidance (:mod:`fmlm.guidance`):

        * ``prefix``: text or token ids the samples start with; ``suffix``: text they end
          with (alone or with a prefix); ``infill``: a template such as
          ``"The [MASK:5] of York"``; or ``known`` ids with a boolean ``mask`` of the
          positions they fix, (L,) or (num_samples, L). Known tokens are kept exactly.
          :attr:`conditioning` says which of these a model takes (AR: a prefix only).
        * ``guide_weak`` (a :class:`Model` or a run directory) and ``guide_weight`` w:
          autoguidance, log D + w·(log D − log D_weak) (FLM and FMLM).
        * ``bos=True``: the first position is the EOS separator, a known token, so a model
          trained on packed (``wrap``) text starts at a document start; other conditioning
          moves one position on (:mod:`fmlm.length`).
        * ``classifier`` (a classifier :class:`Model` or run directory) and ``target``
          (class index or name), or ``reward`` (a function of soft sequences (B, L, V) ->
          (B,)): reward guidance through the look-ahead, with ``reward_scale`` and
          ``reward_iters``.
        """
        if not hasattr(self.method, "sample"):
            raise FmlmError(f"a {self.config.train.method} model does not generate text")
        steps = self.config.sample.steps if steps is None else steps
        seq_len = self.config.data.seq_len if seq_len is None else seq_len
        options = self._guidance_options(options, seq_len)
        if steps < 1:
            raise FmlmError(f"steps must be >= 1, got {steps}")
        if num_samples < 1:
            raise FmlmError(f"num_samples must be >= 1, got {num_samples}")
        if seq_len < 1 or seq_len > self.config.model.max_seq_len:
            raise FmlmError(
                f"sequence length {seq_len} is outside 1..{self.config.model.max_seq_len}, the model's maximum"
            )
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
                kw = {k: _rows(v, start, n, num_samples) if k in ("known", "mask") else v for k, v in extra.items()}
                out.append(self.method.sample(n, seq_len, steps, generator=gen, float64=float64, **kw).cpu())
            except ValueError as e:  # samplers validate their options with ValueError
                raise FmlmError(str(e)) from None
        return torch.cat(out)

    def check_conditioning(self, seq_len: int | None = None, **options) -> None:
        """Raise FmlmError (one line) if ``prefix``/``suffix``/``infill`` cannot be used at ``seq_len``
        (e.g. an unknown word, a template too long); tokenises only, samples nothing."""
        self._guidance_options(options, self.config.data.seq_len if seq_len is None else seq_len)

    def _guidance_options(self, options: dict, seq_len: int) -> dict:
        """Turn the user-level conditioning/guidance options into the samplers' arguments."""
        from fmlm import guidance

        options = dict(options)
        bos = bool(options.pop("bos", False))
        if bos:  # the conditioning below fills positions 1.. of the block
            self._check_bos()
            seq_len -= 1
        prefix, infill = options.pop("prefix", None), options.pop("infill", None)
        suffix = options.pop("suffix", None)
        if sum(x is not None for x in (prefix if prefix is not None else suffix, infill, options.get("known"))) > 1:
            raise FmlmError("give only one of prefix (and/or suffix), infill and known")
        for name, v in (("prefix", prefix), ("suffix", suffix), ("infill", infill)):
            if v is not None and name not in self.conditioning:
                raise FmlmError(
                    f"{name} conditioning does not apply to method {self.config.train.method!r}"
                    + (f" (it takes: {', '.join(self.conditioning)})" if self.conditioning else "")
                )
        if suffix is not None:
            options["known"], options["mask"] = guidance.prefix_suffix(prefix, suffix, self.tokenizer, seq_len)
        elif prefix is not None:
            options["known"] = (
                guidance.prefix_ids(prefix, self.tokenizer, seq_len) if isinstance(prefix, str) else prefix
            )
        if infill is not None:
            options["known"], options["mask"] = guidance.parse_infill(infill, self.tokenizer, seq_len)
        if bos:  # the separator in front of whatever else is known
            options["known"] = length.bos_known(options.get("known"), self.tokenizer.eos_id)
            if options.get("mask") is not None:
                m = torch.as_tensor(options["mask"], dtype=torch.bool)
                options["mask"] = torch.cat([m.new_ones((*m.shape[:-1], 1)), m], -1)
        weak = options.get("guide_weak")
        if weak is not None:
            weak = weak if isinstance(weak, Model) else load(weak, device=self.device)
            self._check_companion(weak, "weak model")
            options["guide_weak"] = weak.method
        elif options.get("guide_weight") is not None:
            raise FmlmError("a guidance weight needs a weak model (guide_weak)")
        clf, target = options.pop("classifier", None), options.pop("target", None)
        if clf is not None:
            if options.get("reward") is not None:
                raise FmlmError("give either a classifier or a reward function, not both")
            clf = clf if isinstance(clf, Model) else load(clf, device=self.device)
            if clf.config.train.method != "classifier":
                raise FmlmError(f"{clf.path} is a {clf.config.train.method} run, not a classifier")
            self._check_companion(clf, "classifier")
            options["reward"] = guidance.classifier_reward(clf.method, clf.class_index(target))
        elif target is not None:
            raise FmlmError("a reward target needs a classifier")
        return options

    def _check_bos(self) -> None:
        """``bos`` needs an EOS token, known-token conditioning and wrap-packed training text."""
        if length.eos_id_of(self.tokenizer) is None:
            raise FmlmError("--bos needs a tokenizer with an EOS token (the document separator); this one has none")
        if "prefix" not in self.conditioning:
            raise FmlmError(f"--bos needs known-token conditioning, which method {self.config.train.method!r} lacks")
        data = self.config.data
        if data.dataset == "phrases" or data.packing != "wrap":
            raise FmlmError(
                "--bos applies to models trained on wrap-packed text; this one's blocks "
                f"({data.dataset}, packing {data.packing}) already start at a sequence start"
            )

    def _check_companion(self, other: "Model", what: str) -> None:
        """A weak model or classifier must share this model's tokenizer and sequence length."""
        if (
            other.config.model.vocab_size != self.config.model.vocab_size
            or other.tokenizer.fingerprint != self.tokenizer.fingerprint
        ):
            raise FmlmError(
                f"the {what} {other.path} has a different vocabulary "
                f"({other.config.model.vocab_size} tokens) from {self.path} ({self.config.model.vocab_size})"
            )
        if other.config.model.max_seq_len != self.config.model.max_seq_len:
            raise FmlmError(
                f"the {what} {other.path} has sequence length {other.config.model.max_seq_len}, "
                f"not {self.config.model.max_seq_len}"
            )

    def class_names(self) -> list[str]:
        """A classifier's class names (phrase texts, or with/without the keyword)."""
        from fmlm.methods.classifier import make_labeller

        return make_labeller(self.config, self.tokenizer)[1]

    def class_index(self, target) -> int:
        """A classifier's class from an index (int or digits) or a class name."""
        names = self.class_names()
        if target is None:
            raise FmlmError(f"reward guidance needs a target class (0..{len(names) - 1} or one of {names})")
        if isinstance(target, int) or str(target).strip().isdigit():
            i = int(target)
            if not 0 <= i < len(names):
                raise FmlmError(f"target class {i} is outside 0..{len(names) - 1}")
            return i
        if target not in names:
            raise FmlmError(f"unknown target class {target!r} (choose from {names})")
        return names.index(target)

    def labels(self, ids: torch.Tensor) -> torch.Tensor:
        """A classifier's derived labels of token ids (the attribute of generated samples)."""
        from fmlm.methods.classifier import make_labeller

        return make_labeller(self.config, self.tokenizer)[0](ids)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(row.tolist()) for row in ids]

    def generate(
        self,
        num_samples: int = 4,
        steps: int | None = None,
        seed: int = 0,
        min_length: int = 0,
        max_tries: int = length.DEFAULT_MAX_TRIES,
        bos: bool = False,
        seq_len: int | None = None,
        length: int | None = None,
        context: int | None = None,
        **kw,
    ) -> Samples:
        """Samples cut at their first EOS, as :class:`fmlm.length.Samples` (ids, texts, the raw blocks).

        A sample with fewer than ``min_length`` tokens is drawn again with seeds derived from
        ``seed``, at most ``max_tries`` draws; one still short is dropped and counted in
        ``rejected``. ``bos`` and ``kw`` are as in :meth:`sample_ids`.

        ``length``: texts of that many tokens, beyond the block too, written block by block, each
        next block conditioned on the last ``context`` tokens (default half the block) as its
        prefix; ``steps`` are per block (:mod:`fmlm.long`)."""
        if length is not None:
            return long.generate(
                self, num_samples, steps, seed, length, context, min_length, max_tries, bos, seq_len, **kw
            )
        if context is not None:
            raise FmlmError("context applies only with a length (--context needs --length)")
        L = self.config.data.seq_len if seq_len is None else seq_len
        if bos:
            self._check_bos()
        check_length_options(min_length, max_tries, L, bos)

        def draw(s: int) -> torch.Tensor:
            return self.sample_ids(num_samples, steps, s, seq_len=seq_len, bos=bos, **kw)

        return generate_samples(draw, self.tokenizer, num_samples, seed, min_length, max_tries, bos)

    def save_pretrained(self, directory: str | Path, name: str | None = None, eval_result=None) -> Path:
        """Write a Hugging Face-style model directory (config.json, model.safetensors with the weights this
        model holds, the tokenizer, a model card README.md) that :func:`from_pretrained` loads back
        exactly; ``eval_result``: an ``fmlm eval`` JSON (path or dict) for the card (see :mod:`fmlm.hub`)."""
        from fmlm.hub import save_model

        return save_model(self, directory, name=name, eval_result=eval_result)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None, **kw):
        """Upload to the Hugging Face Hub as ``repo_id`` (owner/name, created if missing;
        ``pip install 'fmlm[hub]'``); ``revision``, ``commit_message`` as in :func:`fmlm.hub.push`."""
        from fmlm.hub import push_model

        return push_model(self, repo_id, private=private, token=token, **kw)

    def sample(self, num_samples: int = 4, steps: int | None = None, seed: int = 0, **kw) -> list[str]:
        """Sample texts with ``steps`` network evaluations, each ending before its first EOS
        (:meth:`generate`; its ``min_length``, ``max_tries``, ``bos``, ``length`` and ``context`` apply)."""
        return self.generate(num_samples, steps, seed, **kw).texts


def _rows(x, start: int, n: int, total: int):
    """Rows start..start+n of a per-sample (total, L) conditioning tensor; shared ones unchanged."""
    t = torch.as_tensor(x)
    return t[start : start + n] if t.dim() == 2 and t.shape[0] == total and total > 1 else x


def load(path: str | Path, device: str | torch.device | None = None, ema: bool = True, tokenizer=None) -> Model:
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
    dev = pick_device("auto" if device is None else device, what="device")
    cfg, method, tok, p = load_method(path, dev, ema=ema, tokenizer=tokenizer)
    model = Model(cfg, method, tok, p)
    from fmlm.hub.files import weights_of

    model.weights = weights_of(p, ema)
    return model


def from_pretrained(
    name: str | Path,
    revision: str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | None = None,
) -> Model:
    """Load a model directory written by :meth:`Model.save_pretrained` (or ``fmlm export``), or a Hub
    repository ``owner/name`` at ``revision`` (downloaded through huggingface_hub into its cache).

    Strict, with one-line :class:`fmlm.errors.CheckpointError`: a missing file, a model card whose
    ``library_name`` is not fmlm, a checksum, shape or key mismatch. Only JSON and safetensors
    are read.
    """
    from fmlm.hub import resolve

    local = resolve(name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    return load(local, device=device)
