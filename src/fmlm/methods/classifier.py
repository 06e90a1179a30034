"""Sequence classifier over soft one-hot inputs: the differentiable reward of reward guidance.

The classifier reads a sequence of probability vectors p (B, L, V) through the DiT's
linear input layer (p @ E, so one-hot ids and soft look-ahead sequences δ_{s,1}(z_s) go
through the same path), runs the backbone at a fixed time 0, mean-pools the final hidden
states over positions and maps them to class logits (B, C). Its labels are derived from
the text itself (:func:`make_labeller`): the phrase family of the first phrase on the
phrases task, or whether a block contains a keyword on real text.

Training (``fmlm train PRESET method=classifier [label=keyword keyword=love]``) minimises
the cross-entropy of the derived labels. A share ``soft_fraction`` of each batch gets soft
inputs λ·onehot + (1 − λ)·q, λ ~ U[0, 1] per sequence and q = softmax(c·g) per position
(g ~ N(0, I), c ~ U[0, 4]), so the classifier also scores blurred sequences like those a
look-ahead produces early in sampling, and is uncertain where the evidence is gone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fmlm.errors import ConfigError
from fmlm.methods.flm import Strata

Labeller = Callable[[torch.Tensor], torch.Tensor]


def num_classes(cfg) -> int:
    """Number of classes of the configured label."""
    if cfg.classifier.label == "phrase":
        if cfg.data.dataset != "phrases":
            raise ConfigError(
                "classifier.label=phrase needs the phrases dataset; use label=keyword keyword=WORD on real text"
            )
        return cfg.data.phrases_n
    if not cfg.classifier.keyword:
        raise ConfigError("classifier.label=keyword needs classifier.keyword=WORD")
    return 2


def make_labeller(cfg, tokenizer) -> tuple[Labeller, list[str]]:
    """(ids (B, L) -> labels (B,) int64, class names) for the configured label.

    ``phrase``: :meth:`fmlm.data.PhrasesTask.labels` (−1 for an invalid first phrase).
    ``keyword``: 1 when the decoded block contains ``keyword``, else 0.
    """
    num_classes(cfg)  # validates
    if cfg.classifier.label == "phrase":
        from fmlm.data import PhrasesTask

        task = PhrasesTask.from_config(cfg.data)
        return task.labels, [task.phrase_text(i) for i in range(task.n)]
    keyword = cfg.classifier.keyword

    def labels(ids: torch.Tensor) -> torch.Tensor:
        texts = [tokenizer.decode(row) for row in ids.tolist()]
        return torch.tensor([keyword in t for t in texts], dtype=torch.long, device=ids.device)

    return labels, [f"without {keyword!r}", f"with {keyword!r}"]


def soft_inputs(ids: torch.Tensor, vocab_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """λ·onehot(ids) + (1 − λ)·softmax(c·g): random soft versions of ids (B, L) -> (B, L, V)."""
    B = ids.shape[0]
    lam = torch.rand(B, 1, 1, generator=generator, device=ids.device)
    c = 4.0 * torch.rand(B, 1, 1, generator=generator, device=ids.device)
    g = torch.randn(*ids.shape, vocab_size, generator=generator, device=ids.device)
    return lam * F.one_hot(ids, vocab_size).float() + (1 - lam) * (c * g).softmax(-1)


class Classifier(nn.Module):
    """A DiT encoder with a mean-pooled linear head over soft one-hot sequences.

    Args:
        net: one-time DiT over the data vocabulary (its output layer is unused).
        num_classes: C.
        soft_fraction: share of each training batch given soft inputs.
        labeller: ids -> labels; set by :meth:`bind_tokenizer` when training.
    """

    def __init__(
        self, net: nn.Module, num_classes: int, soft_fraction: float = 0.5, labeller_factory: Callable | None = None
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError("a classifier needs at least 2 classes")
        self.net = net
        self.num_classes = num_classes
        self.soft_fraction = soft_fraction
        self.head = nn.Linear(net.embed.shape[1], num_classes)
        self._labeller_factory = labeller_factory
        self.labeller: Labeller | None = None

    @property
    def vocab_size(self) -> int:
        return self.net.vocab_size

    def bind_tokenizer(self, tokenizer) -> None:
        """Called by the trainer: the labels of keyword attributes need the tokenizer."""
        if self._labeller_factory is not None:
            self.labeller = self._labeller_factory(tokenizer)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C) of ids (B, L) or soft sequences (B, L, V); differentiable in x."""
        tau = torch.zeros(x.shape[0], device=x.device)
        h = self.net.features(x, tau)  # (B, L, D)
        return self.head(h.mean(1)).float()

    def _batch(self, ids: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self.labeller is None:
            raise ConfigError("the classifier has no labeller (call bind_tokenizer first)")
        labels = self.labeller(ids)
        x = F.one_hot(ids, self.vocab_size).float()
        n_soft = round(ids.shape[0] * self.soft_fraction)
        if n_soft:
            x = torch.cat(
                [x[: ids.shape[0] - n_soft], soft_inputs(ids[ids.shape[0] - n_soft :], self.vocab_size, generator)]
            )
        return x, labels, n_soft

    def loss(
        self, ids: torch.Tensor, generator: torch.Generator | None = None, strata: Strata | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Cross-entropy of the derived labels (samples labelled −1 are ignored); ``strata`` is unused."""
        x, labels, _ = self._batch(ids, generator)
        loss = F.cross_entropy(self(x), labels, ignore_index=-1)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def eval_loss(self, ids: torch.Tensor, generator: torch.Generator) -> dict:
        """Validation CE and accuracy on one-hot inputs, and accuracy on the soft ones."""
        x, labels, n_soft = self._batch(ids, generator)
        logits = self(x)
        n_hard = ids.shape[0] - n_soft
        ce = F.cross_entropy(logits[:n_hard], labels[:n_hard], ignore_index=-1).item()
        correct = (logits.argmax(-1) == labels).float()
        out = {"ce": ce, "acc": correct[:n_hard].mean().item()}
        if n_soft:
            out["acc_soft"] = correct[n_hard:].mean().item()
        return out
