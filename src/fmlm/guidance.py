"""Inference-time guidance and conditioning for the flow models (and clamping for the baselines).

Three mechanisms, all applied inside the samplers (:func:`fmlm.methods.flm.euler_sample`,
:meth:`fmlm.methods.flow_map.FMLM.sample`, and the clamping of MDLM / Duo / AR):

* **Known tokens** (prefix conditioning, infilling). ``known`` ids (B, L) and a boolean
  ``mask`` (B, L) of the positions they fix. For FLM/FMLM, before every network call the
  known positions of the state are replaced by the interpolant of their one-hot at the
  current time, I_t = (1 − t)·x0 + t·onehot, with the *same* noise draw x0 as the initial
  state (a fresh draw each step would make those positions jump around instead of moving
  along one interpolant path, and would change the random stream of the unconditioned
  positions). The returned distribution is the one-hot at known positions, so the output
  keeps them exactly. At t = 0 the interpolant is the noise itself and carries no
  information, which makes pure replacement useless for a one-step flow map; the flow-map
  sampler therefore also *inverts* the known positions' noise (``invert_iters``): a few
  normalised gradient steps on x0 at the known positions that raise
  Σ_known log δ_{0,1}(z0)[known token], i.e. reward guidance (below) with the known
  tokens' log-likelihood as the reward. The FLM Euler sampler's look-ahead at t = 0 is
  D_0, the per-position marginal, which is flat in x0, so it cannot invert; instead, at
  every step it steers the *unknown* positions by the gradient of the same log-likelihood
  through D_t (reconstruction guidance), so that the free positions agree with the known
  ones: replacement alone lets them commit before the known positions' interpolant carries
  enough signal.
* **Autoguidance** (Karras et al., 2024): with a weaker model of the same data,
  log D_guided = log D_main + w·(log D_main − log D_weak), renormalised (a softmax of the
  main logits plus w times the difference of log-softmaxes, so w = 0 is bit-for-bit the
  unguided sampler). Both networks see the same state and times. For the flow map the same
  is done to δ_{s,t}.
* **Reward guidance with a differentiable look-ahead.** At state z_s the flow map looks
  ahead to x̂_1 = δ_{s,1}(z_s) (FLM: D_s(z_s)), a point on the simplex; a differentiable
  reward r(x̂_1) (e.g. the log-probability of a target class under a classifier over soft
  one-hot sequences, :class:`fmlm.methods.classifier.Classifier`) is back-propagated to
  z_s, which moves along the per-sample normalised gradient by ``scale·(1 − t)`` per
  coordinate (root mean square), i.e. by ``scale`` standard deviations of the state's noise
  at time t: large steps early, none at t = 1; ``iters`` such steps per sampler step. The
  look-ahead fed to the reward is softened to softmax(logits / T) (``reward_temperature``,
  default 8): a trained flow map's one-step output is nearly one-hot, its softmax saturates
  and the gradient vanishes almost everywhere (median norm ~1e-5 on the phrases task, where
  guidance at T = 1 stalls at ~50% target share while T = 8 reaches ~95%).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fmlm.errors import FmlmError
from fmlm.paths import interpolant

if TYPE_CHECKING:
    from fmlm.data.tokenizers import Tokenizer

# A reward maps soft sequences (B, L, V) on the simplex to one score per sample (B,).
Reward = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------- known tokens
def known_tensors(
    known: Sequence[int] | torch.Tensor | None,
    mask: Sequence[bool] | torch.Tensor | None,
    num_samples: int,
    seq_len: int,
    vocab_size: int,
    device: str | torch.device | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Normalise conditioning arguments to ids (B, L) int64 and a mask (B, L) bool.

    ``known`` is a sequence or tensor of ids, (L,), (B, L), or shorter than L along the
    last dim (a prefix); without ``mask`` its positions are all known. ``mask`` (L,) or
    (B, L) marks the known positions (the ids elsewhere are ignored). Raises ValueError on
    bad shapes or ids outside the vocabulary.
    """
    if known is None:
        if mask is not None:
            raise ValueError("a mask of known positions needs the known ids")
        return None, None
    ids = torch.as_tensor(known, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] not in (1, num_samples):
        raise ValueError(f"known ids must be (L,) or ({num_samples}, L), got shape {tuple(ids.shape)}")
    if ids.shape[1] > seq_len:
        raise ValueError(f"{ids.shape[1]} known tokens do not fit in a sequence of length {seq_len}")
    if mask is None:
        m = torch.zeros(ids.shape[0], seq_len, dtype=torch.bool, device=device)
        m[:, : ids.shape[1]] = True
    else:
        m = torch.as_tensor(mask, dtype=torch.bool, device=device)
        if m.dim() == 1:
            m = m[None]
        if m.shape[-1] != ids.shape[1] or m.shape[0] not in (1, num_samples):
            raise ValueError(f"mask shape {tuple(m.shape)} does not match the known ids {tuple(ids.shape)}")
        m = F.pad(m, (0, seq_len - m.shape[1]))
    ids = F.pad(ids, (0, seq_len - ids.shape[1]))
    ids = torch.where(m, ids, torch.zeros_like(ids))  # ignored positions: any valid id
    if bool(((ids < 0) | (ids >= vocab_size)).any()):
        raise ValueError(f"known ids must be in [0, {vocab_size})")
    return ids.expand(num_samples, seq_len), m.expand(num_samples, seq_len)


def replace_known(
    z: torch.Tensor, known: torch.Tensor | None, mask: torch.Tensor | None, noise: torch.Tensor, t: float | torch.Tensor
) -> torch.Tensor:
    """z with the known positions set to the interpolant (1 − t)·noise + t·onehot(known)."""
    if known is None:
        return z
    return torch.where(mask[..., None], interpolant(known, t, noise.to(z.dtype)), z)


def clamp_known(p: torch.Tensor, known: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """Distribution p (B, L, V) with the known positions replaced by their one-hot."""
    if known is None:
        return p
    return torch.where(mask[..., None], F.one_hot(known, p.shape[-1]).to(p.dtype), p)


def known_loglik(known: torch.Tensor, mask: torch.Tensor) -> Reward:
    """Reward Σ_known log p[known token] of a soft sequence (the inversion objective)."""

    def reward(p: torch.Tensor) -> torch.Tensor:
        logp = p.clamp_min(1e-12).log().gather(-1, known[..., None]).squeeze(-1)  # (B, L)
        return (logp * mask).sum(-1)

    return reward


def invert_known(
    z: torch.Tensor,
    lookahead: Callable[[torch.Tensor], torch.Tensor],
    known: torch.Tensor,
    mask: torch.Tensor,
    scale: float = 0.1,
    iters: int = 50,
    threshold: float = 0.99,
) -> torch.Tensor:
    """Move the known positions of a t = 0 state until the look-ahead predicts the known tokens.

    Each iteration takes one normalised gradient step (RMS ``scale`` per moved coordinate) on
    Σ_known log p[known], p = lookahead(z), for the samples whose look-ahead still gives some
    known token a probability below ``threshold``; the others are left alone. Only known
    positions move, so the rest of the state keeps its Gaussian draw.
    """
    active = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    reward = known_loglik(known, mask)
    n = (mask.flatten(1).sum(-1).clamp_min(1) * z.shape[-1]).to(torch.float32)  # coordinates that move
    for _ in range(iters):
        with torch.enable_grad():
            zz = z.detach().float().requires_grad_(True)
            p = lookahead(zz)
            (g,) = torch.autograd.grad(reward(p).sum(), zz)
        with torch.no_grad():
            pk = p.detach().gather(-1, known[..., None]).squeeze(-1)  # (B, L)
            ok = torch.where(mask, pk >= threshold, torch.ones_like(mask)).all(-1)
            active = active & ~ok
            if not active.any():
                break
            g = g * (mask & active[:, None])[..., None]
            rms = (g.pow(2).flatten(1).sum(-1) / n).sqrt().clamp_min(1e-20)[:, None, None]
            z = z + (scale * g / rms).to(z.dtype)
    return z


# ---------------------------------------------------------------------------------------- autoguidance
def guided_logits(logits: torch.Tensor, weak_logits: torch.Tensor | None, weight: float) -> torch.Tensor:
    """logits + w·(log_softmax(logits) − log_softmax(weak_logits)); softmax of it is the guided D.

    With ``weight`` 0 the result equals ``logits`` exactly (x + 0 = x), so a guided sampler
    at w = 0 is bit-for-bit the unguided one.
    """
    if weak_logits is None:
        return logits
    return logits + weight * (logits.log_softmax(-1) - weak_logits.log_softmax(-1))


def check_weak(main: torch.nn.Module, weak: torch.nn.Module, what: str = "weak model") -> None:
    """Autoguidance needs a weak model of the same kind, vocabulary and time reparameterisation."""
    if type(weak) is not type(main):
        raise FmlmError(f"the {what} must be a {type(main).__name__} like the main model, got a {type(weak).__name__}")
    if weak.vocab_size != main.vocab_size:
        raise FmlmError(
            f"the {what}'s vocabulary ({weak.vocab_size}) differs from the main model's ({main.vocab_size})"
        )
    if type(weak.schedule) is not type(main.schedule):
        raise FmlmError(f"the {what} uses a different time reparameterisation")


# ---------------------------------------------------------------------------------------- reward guidance
@dataclass
class Steering:
    """Gradient steering of a state through a differentiable look-ahead.

    Args:
        reward: soft sequences (B, L, V) -> (B,), differentiable.
        scale: step size in units of the state's noise std (1 − t) per coordinate (RMS).
        iters: gradient steps per sampler step.
        update: optional (B, L) bool: only these positions move (others keep their state).
    """

    reward: Reward
    scale: float = 0.1
    iters: int = 10
    update: torch.Tensor | None = None

    def __post_init__(self):
        if self.scale < 0 or self.iters < 0:
            raise ValueError("reward scale and iterations must be >= 0")

    def __call__(self, z: torch.Tensor, lookahead: Callable[[torch.Tensor], torch.Tensor], t: float) -> torch.Tensor:
        """z moved ``iters`` times by scale·(1 − t)·∇r/rms(∇r); ``lookahead(z)`` -> (B, L, V)."""
        if self.scale == 0 or self.iters == 0 or t >= 1:
            return z
        for _ in range(self.iters):
            g = reward_gradient(z, lookahead, self.reward)
            if self.update is not None:
                g = g * self.update[..., None].to(g.dtype)
                n = self.update.flatten(1).sum(-1).clamp_min(1) * z.shape[-1]  # (B,) coordinates that move
            else:
                n = torch.full((z.shape[0],), z[0].numel(), device=z.device)
            rms = (g.pow(2).flatten(1).sum(-1) / n).sqrt().clamp_min(1e-20)[:, None, None]
            z = z + (self.scale * (1 - t)) * (g / rms).to(z.dtype)
        return z


def chain(steers: list[Steering]) -> Callable | None:
    """One steering callable applying ``steers`` in order (None when there are none)."""
    if not steers:
        return None

    def steer(z: torch.Tensor, lookahead, t: float) -> torch.Tensor:
        for s in steers:
            z = s(z, lookahead, t)
        return z

    return steer


def reward_gradient(z: torch.Tensor, lookahead: Callable[[torch.Tensor], torch.Tensor], reward: Reward) -> torch.Tensor:
    """∇_z Σ_b r(lookahead(z))_b, float32, with gradients enabled even inside ``no_grad``."""
    with torch.enable_grad():
        zz = z.detach().float().requires_grad_(True)
        r = reward(lookahead(zz))
        (g,) = torch.autograd.grad(r.sum(), zz)
    return g


def classifier_reward(classifier: torch.nn.Module, target: int) -> Reward:
    """r(p) = log softmax(classifier(p))[target]: the target class's log-probability."""
    if not 0 <= target < classifier.num_classes:
        raise FmlmError(f"reward target {target} is outside the classifier's {classifier.num_classes} classes")

    def reward(p: torch.Tensor) -> torch.Tensor:
        return classifier(p).log_softmax(-1)[:, target]

    return reward


# ---------------------------------------------------------------------------------------- CLI syntax
_MASK = re.compile(r"\[MASK(?::(\d+))?\]")


def parse_infill(text: str, tokenizer: Tokenizer, seq_len: int) -> tuple[list[int], list[bool]]:
    """Parse ``"The [MASK:5] of York"`` into known ids and a known-position mask (template length).

    ``[MASK:n]`` is n unknown tokens, ``[MASK]`` one; the text between masks is tokenised
    with the model's tokenizer (a word tokenizer needs the spaces around words, a char
    tokenizer keeps them). Positions after the text are unknown (the model continues).
    """
    if "[MASK" not in text:
        raise FmlmError("--infill needs at least one [MASK] or [MASK:n] (use --prefix for a plain prefix)")
    for m in re.finditer(r"\[MASK[^\]\[]*\]?", text):
        if not _MASK.fullmatch(m.group(0)):
            raise FmlmError(f"bad mask syntax {m.group(0)!r}: write [MASK] or [MASK:n] with n a positive number")
    pieces = _MASK.split(text)  # text, n, text, n, ..., text
    counts = [1 if c is None else (int(c) if len(c) <= 9 else seq_len + 1) for c in pieces[1::2]]
    if sum(counts) > seq_len:  # checked before anything of that size is allocated
        raise FmlmError(f"the infill template masks more tokens than the sequence length {seq_len}")
    ids: list[int] = []
    mask: list[bool] = []
    for j, piece in enumerate(pieces):
        if j % 2:  # a mask's count (None for a bare [MASK])
            n = 1 if piece is None else (int(piece) if len(piece) <= 9 else seq_len + 1)
            if n < 1:
                raise FmlmError(f"[MASK:{n}] must mask at least one token")
            if len(ids) + n > seq_len:  # checked before anything of that size is allocated
                raise FmlmError(
                    f"[MASK:{piece}] does not fit: the infill template would be longer than the "
                    f"sequence length {seq_len}"
                )
            ids += [0] * n
            mask += [False] * n
        elif piece and (piece.strip() or not _is_word_level(tokenizer)):
            toks = encode_text(piece, tokenizer)
            ids += toks
            mask += [True] * len(toks)
    if len(ids) > seq_len:
        raise FmlmError(f"the infill template is {len(ids)} tokens long, more than the sequence length {seq_len}")
    return ids, mask


def _is_word_level(tokenizer) -> bool:
    return type(tokenizer).__name__ == "WordTokenizer"


def encode_text(text: str, tokenizer: Tokenizer) -> list[int]:
    """Token ids of ``text``, as one clear error when the tokenizer cannot encode it."""
    try:
        return list(tokenizer.encode(text))
    except (KeyError, ValueError, FmlmError) as e:
        raise FmlmError(f"cannot tokenise {text!r} with the model's tokenizer: {e}") from None


def prefix_ids(text: str, tokenizer: Tokenizer, seq_len: int) -> list[int]:
    """Token ids of a ``--prefix`` text, checked to fit."""
    ids = encode_text(text, tokenizer)
    if not ids:
        raise FmlmError("the prefix is empty after tokenisation")
    if len(ids) > seq_len:
        raise FmlmError(f"the prefix is {len(ids)} tokens long, more than the sequence length {seq_len}")
    return ids


def prefix_suffix(
    prefix: str | Sequence[int] | None, suffix: str, tokenizer: Tokenizer, seq_len: int
) -> tuple[list[int], list[bool]]:
    """Known ids and mask (length ``seq_len``) for a suffix the samples end with, and an optional
    prefix (text or ids) they start with; the positions between are free."""
    head = (
        []
        if prefix is None
        else (prefix_ids(prefix, tokenizer, seq_len) if isinstance(prefix, str) else [int(i) for i in prefix])
    )
    tail = encode_text(suffix, tokenizer)
    if not tail:
        raise FmlmError("the suffix is empty after tokenisation")
    if len(head) + len(tail) > seq_len:
        raise FmlmError(
            f"the prefix and suffix are {len(head) + len(tail)} tokens long, more than the sequence length {seq_len}"
        )
    free = seq_len - len(head) - len(tail)
    return head + [0] * free + tail, [True] * len(head) + [False] * free + [True] * len(tail)
