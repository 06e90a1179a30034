"""Training-time conditioning: the "given" positions of a training row, and the helpers that use them.

With ``train.cond_prob`` = p > 0 a training row is *conditioned* with probability p: some of
its positions are given (a clean prefix of random length 1..L−1 or, with probability
``train.cond_infill_prob`` among the conditioned rows, random spans), they enter the network
clean (FLM / flow maps: their one-hot, i.e. the interpolant at t = 1; MDLM / Duo: the
unmasked / uncorrupted token), they are flagged to the network by a learned "given"
embedding added to its input (:class:`fmlm.nn.dit.DiT`, ``given_embedding``), and they
carry no loss. ``train.cfg_drop`` = q drops the conditioning of a conditioned row with
probability q (it is then an ordinary unconditional row), so the same network also learns
the unconditional model that classifier-free guidance contrasts with (the share of
unconditional rows is 1 − p·(1 − q)).

At sampling time the learned conditional clamps the known positions to their clean value at
every step and flags them as given; classifier-free guidance with weight w uses
log D = log D_cond + w·(log D_cond − log D_uncond), renormalised, where D_uncond is the same
network without the flag and with the known positions on their noisy interpolant, as in an
unconditional training row (:func:`fmlm.guidance.guided_logits`; w = 0 is D_cond exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fmlm.paths import EmbeddedState

#: Sampling modes of known tokens: the learned conditional or the sampling-time steering.
COND_MODES = ("learned", "steer")


@dataclass(frozen=True)
class Conditioning:
    """The training-time conditioning of a method: ``prob`` of a conditioned row, ``infill_prob`` of
    spans (instead of a prefix) in a conditioned row, ``cfg_drop`` of dropping a row's conditioning."""

    prob: float
    infill_prob: float = 0.0
    cfg_drop: float = 0.0

    @classmethod
    def from_config(cls, train_cfg) -> "Conditioning | None":
        """The conditioning of a :class:`fmlm.config.TrainConfig`; None when ``cond_prob`` is 0."""
        p = getattr(train_cfg, "cond_prob", 0.0)
        if p <= 0:
            return None
        return cls(p, train_cfg.cond_infill_prob, train_cfg.cfg_drop)

    def draw(self, batch: int, length: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """Given positions (batch, length) bool of a training batch; every row keeps a free position.

        A prefix has a length uniform in 1..L−1; infill spans alternate given and free runs, cut
        after each position with a per-row probability uniform in [0.1, 0.5), starting given or
        free at random. A row of length 1 is never conditioned (nothing would be left to learn).
        """
        u = torch.rand(batch, 5, generator=generator, device=device)  # conditioned, dropped, length, infill, free
        cond = u[:, 0] < self.prob
        if self.cfg_drop > 0:
            cond &= u[:, 1] >= self.cfg_drop
        if length < 2:
            return torch.zeros(batch, length, dtype=torch.bool, device=device)
        pos = torch.arange(length, device=device)
        n = 1 + (u[:, 2] * (length - 1)).long().clamp_max(length - 2)  # 1..L−1
        given = pos[None] < n[:, None]
        if self.infill_prob > 0:
            rate = 0.1 + 0.4 * torch.rand(batch, 1, generator=generator, device=device)
            cuts = torch.rand(batch, length, generator=generator, device=device) < rate
            start = (torch.rand(batch, 1, generator=generator, device=device) < 0.5).long()
            spans = (cuts.long().cumsum(1) + start) % 2 == 0
            # At least one free position: an all-given row frees a random one.
            full = spans.all(1)
            free_at = (u[:, 4] * length).long().clamp_max(length - 1)
            spans[full, free_at[full]] = False
            given = torch.where((u[:, 3] < self.infill_prob)[:, None], spans, given)
        return given & cond[:, None]


def free_mean(per_token: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """Mean of a per-token loss (B, L) over the free (not given) positions."""
    free = (~given).to(per_token.dtype)
    return (per_token * free).sum() / free.sum().clamp_min(1.0)


def clean_state(x, ids: torch.Tensor, given: torch.Tensor):
    """A state (V-space tensor (B, L, V), embedded tensor (B, L, d) with ``embed``, or
    :class:`EmbeddedState`) with the given positions set to their clean one-hot (its embedding)."""
    g = given[..., None]
    if isinstance(x, EmbeddedState):
        return EmbeddedState(lambda E: torch.where(g, F.embedding(ids, E).float(), x.embed(E)))
    return torch.where(g, F.one_hot(ids, x.shape[-1]).to(x.dtype), x)


def clean_embedded(h: torch.Tensor, ids: torch.Tensor, given: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """An embedded state h = x @ E (B, L, d) with the given positions set to E[ids]."""
    return torch.where(given[..., None], F.embedding(ids, E).to(h.dtype), h)


def clamp_onehot(p: torch.Tensor, ids: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    """A distribution (B, L, V) with the given positions replaced by their one-hot (None: unchanged)."""
    if given is None:
        return p
    return torch.where(given[..., None], F.one_hot(ids, p.shape[-1]).to(p.dtype), p)


def net_kw(given: torch.Tensor | None) -> dict:
    """The backbone keyword of the given flag: none at all when there is no flag (so backbones
    without the embedding, and every unconditioned call, run exactly as before)."""
    return {} if given is None else {"given": given}


def resolve_mode(method, cond_mode: str | None, known) -> str | None:
    """The sampling mode of known tokens: ``learned`` when the backbone has a given embedding,
    ``steer`` otherwise (None without known tokens). ValueError for ``learned`` on a model trained
    without conditioning or an unknown mode."""
    if cond_mode is not None and cond_mode not in COND_MODES:
        raise ValueError(f"unknown cond_mode {cond_mode!r} (choose from {', '.join(COND_MODES)})")
    has = getattr(method.net, "given_embed", None) is not None
    if known is None:
        return None
    mode = cond_mode or ("learned" if has else "steer")
    if mode == "learned" and not has:
        raise ValueError(
            "this model was trained without conditioning (train.cond_prob = 0): its prefix/infill use the "
            "sampling-time steering (cond_mode='steer', no --cfg-weight)"
        )
    return mode


def check_cfg(cfg_weight: float | None, mode: str | None) -> None:
    """Classifier-free guidance (any weight, 0 included) needs known tokens and the learned conditional."""
    if cfg_weight is not None and mode != "learned":
        raise ValueError(
            "classifier-free guidance (cfg_weight) needs a prefix or infill and the learned conditioning "
            "of a model trained with train.cond_prob > 0"
        )
