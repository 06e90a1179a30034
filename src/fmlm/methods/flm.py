"""Flow-based language model (FLM): stage 1 of the method.

Maths (METHOD.md §1–3). Tokens are one-hot vectors x1 ∈ {0,1}^{L×V}; noise
x0 ~ N(0, I) has the same shape; the interpolant is I_t = (1 − t)·x0 + t·x1.
The denoiser D_t(x) = E[x1 | I_t = x] = p(x1 | I_t = x) is a token-wise softmax
of the backbone's logits, trained by cross-entropy. The flow's velocity is
b_t(x) = (D_t(x) − x)/(1 − t), integrated with Euler steps uniform in the
decoding-error time τ, on which the network is conditioned (t = t(τ)).

Ablations (``loss=``): ``ce`` (the method), ``mse_denoiser`` (squared error of
softmax(logits) to the one-hot), ``mse_velocity`` (raw outputs regress the
velocity x1 − x0, the failing baseline of the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fmlm import conditioning as conditioning_
from fmlm.guidance import (
    Steering,
    chain,
    check_weak,
    clamp_known,
    guided_logits,
    known_loglik,
    known_tensors,
    replace_known,
)
from fmlm.paths import EmbeddedState, embedded_noise, interpolant, run_net
from fmlm.schedule import Schedule

# A denoiser maps (state z (B, L, V), network time τ (B,)) to D on the simplex (B, L, V).
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Strata:
    """Part ``index`` of a global batch split into ``count`` equal parts (ranks x accumulation steps).

    Passed to a method's ``loss`` by the trainer, so that :func:`stratified_uniform` returns this
    part's share of one grid over the whole global batch: the offset comes from ``shared``
    (seeded identically in every part, so all parts agree on it) and part k takes the points
    k, k + K, k + 2K, ...
    """

    index: int
    count: int
    shared: torch.Generator


def stratified_uniform(
    batch: int,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    strata: Strata | None = None,
) -> torch.Tensor:
    """τ ~ U[0, 1) drawn as one uniform offset plus an evenly spaced grid (antithetic / stratified).

    Every τ is marginally uniform, and the batch covers [0, 1) evenly, which lowers
    the variance of the batch-mean loss. With ``strata`` the grid spans the global batch
    instead of this part of it (the offset then comes from ``strata.shared``).
    """
    if strata is not None:
        k, K = strata.index, strata.count
        u = torch.rand((), generator=strata.shared, device=device)
        return (u + (k + K * torch.arange(batch, device=device)) / (K * batch)) % 1.0
    u = torch.rand((), generator=generator, device=device)
    return (u + torch.arange(batch, device=device) / batch) % 1.0


def denoising_metrics(log_d: torch.Tensor, ids: torch.Tensor) -> dict:
    """Token-level CE −log D[x1] and argmax accuracy of a denoiser's log-probabilities (B, L, V)."""
    ce = -log_d.gather(-1, ids[..., None]).mean()
    acc = (log_d.argmax(-1) == ids).float().mean()
    return {"ce": ce.item(), "acc": acc.item()}


@torch.no_grad()
def euler_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    schedule: Schedule,
    steps: int,
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    known: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    steer: Callable[[torch.Tensor, Callable, float], torch.Tensor] | None = None,
    lookahead: Denoiser | None = None,
    clean_known: bool = False,
) -> torch.Tensor:
    """Integrate the FLM probability-flow ODE with Euler steps on a uniform τ grid.

    ``z ← z + (t_{i+1} − t_i)·(D(z, τ_i) − z)/(1 − t_i)``; the last step returns
    ``D(z, τ_{N−1})`` itself, which is exactly where the last Euler step lands.
    Conditioning and guidance (:mod:`fmlm.guidance`): before each network call the
    known positions are set to their interpolant with the initial noise, and ``steer``
    moves z along the reward gradient through the one-step look-ahead D_t(z); the
    output is one-hot at known positions.

    Args:
        denoiser: (z, τ) -> D on the simplex.
        noise: initial state z0 ~ N(0, I), (B, L, V).
        schedule: maps τ to t.
        steps: number of network evaluations N ≥ 1.
        dtype: dtype of the state and the update (float64 for a high-precision flow).
        callback: called as ``callback(i, z, D)`` after every network evaluation.
        known, mask: (B, L) ids and bool mask of known positions (see :func:`fmlm.guidance.known_tensors`).
        steer: reward guidance, applied before each network evaluation.
        lookahead: the (z, τ) -> simplex map whose output the reward scores (default: denoiser).
        clean_known: the known positions are their clean one-hot at every step (the learned
            conditioning, whose ``denoiser`` flags them as given) instead of their interpolant.

    Returns:
        The final denoiser output D (B, L, V); decode with ``argmax(-1)``.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    B = noise.shape[0]
    z = noise.to(dtype)
    taus = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=noise.device)
    ts = schedule.t(taus)
    for i in range(steps):
        tau = taus[i].to(torch.float32).expand(B)
        t_known = 1.0 if clean_known else ts[i]
        z = replace_known(z, known, mask, noise, t_known)
        if steer is not None:
            look = denoiser if lookahead is None else lookahead
            z = replace_known(steer(z, lambda x: look(x, tau), float(ts[i])), known, mask, noise, t_known)
        D = clamp_known(denoiser(z, tau).to(dtype), known, mask)  # (B, L, V)
        if callback is not None:
            callback(i, z, D)
        if i == steps - 1:
            return D
        t, t_next = ts[i].to(dtype), ts[i + 1].to(dtype)
        z = z + (t_next - t) * (D - z) / (1.0 - t)
    raise AssertionError("unreachable")  # pragma: no cover


class FLM(nn.Module):
    """Wraps a one-time backbone ``net(x, τ) -> logits`` as a flow-based language model.

    Args:
        net: backbone mapping (B, L, V) vectors and τ (B,) to logits (B, L, V).
        schedule: the time reparameterisation (decoding-error or uniform).
        loss_type: ``ce`` | ``mse_denoiser`` | ``mse_velocity``.
        noise: ``embedded`` (the default, as ``train.noise``) draws x0 @ E in the embedding space
            (:mod:`fmlm.paths`); ``vocab`` draws x0 in R^{L×V} (the reference).
            ``mse_velocity`` needs x0 itself and always uses ``vocab``.
        cond: training-time conditioning (:class:`fmlm.conditioning.Conditioning`; None: none).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        loss_type: str = "ce",
        noise: str = "embedded",
        cond: conditioning_.Conditioning | None = None,
    ):
        super().__init__()
        self.cond = cond
        if noise not in ("vocab", "embedded"):
            raise ValueError(f"unknown noise path {noise!r}")
        self.noise = noise
        if loss_type not in ("ce", "mse_denoiser", "mse_velocity"):
            raise ValueError(f"unknown loss {loss_type!r}")
        self.net = net
        self.schedule = schedule
        self.loss_type = loss_type

    @property
    def vocab_size(self) -> int:
        return self.net.vocab_size

    def interpolate(self, ids: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """I_t = (1 − t)·x0 + t·onehot(ids); ids (B, L), t (B,), noise (B, L, V)."""
        return interpolant(ids, t, noise)

    @property
    def uses_embedded_noise(self) -> bool:
        return self.noise == "embedded" and self.loss_type != "mse_velocity"

    def embedded_interpolant(self, ids: torch.Tensor, t: torch.Tensor, generator=None) -> torch.Tensor:
        """I_t @ E = (1 − t)·(x0 @ E) + t·E[ids] (B, L, d), with x0 @ E drawn in d-space."""
        (y,) = embedded_noise([self.net.embed], ids.shape, generator)
        return EmbeddedState.interpolant({id(self.net.embed): y}, ids, t).embed(self.net.embed)

    def denoise(
        self,
        z: torch.Tensor,
        tau: torch.Tensor,
        weak: "FLM | None" = None,
        weight: float = 0.0,
        temperature: float = 1.0,
        given: torch.Tensor | None = None,
        cfg_weight: float = 0.0,
        z_uncond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """D(z, τ) on the simplex, float32, (B, L, V); z may be an :class:`EmbeddedState`.

        With a ``weak`` FLM: autoguidance, softmax(log D + w·(log D − log D_weak)) (both
        networks see the same z and τ; w = 0 gives D bit for bit). ``temperature`` T ≠ 1
        softens the result to softmax(logits / T) (the reward look-ahead). ``given`` (B, L)
        flags the known positions (learned conditioning); with ``z_uncond`` (the state as an
        unconditioned row sees it) classifier-free guidance with weight ``cfg_weight``:
        softmax(log D_cond + w·(log D_cond − log D_uncond)), w = 0 exactly D_cond.
        """
        out = run_net(self.net, z, tau, **conditioning_.net_kw(given)).float()
        if z_uncond is not None:
            out = guided_logits(out, run_net(self.net, z_uncond, tau).float(), cfg_weight)
        if self.loss_type == "mse_velocity":
            # The network predicts the velocity v; the implied denoiser is z + (1 − t)·v.
            # It is not a distribution, but the Euler update only needs D − z.
            t = self.schedule.t(tau.double()).float()[:, None, None]
            return z.float() + (1.0 - t) * out
        weak_out = None if weak is None else weak.net(z, tau).float()
        out = guided_logits(out, weak_out, weight)
        return (out if temperature == 1.0 else out / temperature).softmax(-1)

    def loss(
        self, ids: torch.Tensor, generator: torch.Generator | None = None, strata: Strata | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Training loss on a batch of token ids (B, L). Returns (loss, metrics).

        ``strata``: this batch is one part of a global batch (:class:`Strata`)."""
        if self.cond is not None:
            return self._conditioned_loss(ids, generator, strata)
        B = ids.shape[0]
        tau = stratified_uniform(B, generator, ids.device, strata)
        t = self.schedule.t(tau.double()).float()
        if self.uses_embedded_noise:
            out = self.net(None, tau, embedded=self.embedded_interpolant(ids, t, generator)).float()
            if self.loss_type == "ce":
                loss = F.cross_entropy(out.flatten(0, 1), ids.flatten())
            else:  # mse_denoiser: Σ_v (p_v − 1[v = x1])² = Σ p² − 2 p[x1] + 1, without a one-hot
                p = out.softmax(-1)
                loss = (p.pow(2).sum(-1) - 2 * p.gather(-1, ids[..., None]).squeeze(-1) + 1).mean()
            return loss, {"loss": loss.detach()}
        noise = torch.randn(*ids.shape, self.vocab_size, generator=generator, device=ids.device)
        x = self.interpolate(ids, t, noise)  # (B, L, V)
        out = self.net(x, tau).float()  # (B, L, V)
        x1 = F.one_hot(ids, self.vocab_size).float()
        if self.loss_type == "ce":
            loss = F.cross_entropy(out.flatten(0, 1), ids.flatten())
        elif self.loss_type == "mse_denoiser":
            loss = (out.softmax(-1) - x1).pow(2).sum(-1).mean()
        else:
            loss = (out - (x1 - noise)).pow(2).sum(-1).mean()
        return loss, {"loss": loss.detach()}

    def _conditioned_loss(self, ids: torch.Tensor, generator, strata) -> tuple[torch.Tensor, dict]:
        """The loss of :meth:`loss` with given positions (:mod:`fmlm.conditioning`): they enter clean,
        flagged by the given embedding, and the loss is the mean over the free positions."""
        B, L = ids.shape
        tau = stratified_uniform(B, generator, ids.device, strata)
        t = self.schedule.t(tau.double()).float()
        given = self.cond.draw(B, L, generator, ids.device)
        noise = None
        if self.uses_embedded_noise:
            h = conditioning_.clean_embedded(self.embedded_interpolant(ids, t, generator), ids, given, self.net.embed)
            out = self.net(None, tau, embedded=h, given=given).float()
        else:
            noise = torch.randn(*ids.shape, self.vocab_size, generator=generator, device=ids.device)
            x = conditioning_.clean_state(self.interpolate(ids, t, noise), ids, given)
            out = self.net(x, tau, given=given).float()
        if self.loss_type == "ce":
            per_token = F.cross_entropy(out.flatten(0, 1), ids.flatten(), reduction="none").view(B, L)
        elif self.loss_type == "mse_denoiser":
            p = out.softmax(-1)
            per_token = p.pow(2).sum(-1) - 2 * p.gather(-1, ids[..., None]).squeeze(-1) + 1
        else:
            per_token = (out - (F.one_hot(ids, self.vocab_size).float() - noise)).pow(2).sum(-1)
        loss = conditioning_.free_mean(per_token, given)
        return loss, {"loss": loss.detach(), "given": given.float().mean()}

    @torch.no_grad()
    def eval_loss(self, ids: torch.Tensor, generator: torch.Generator) -> dict:
        """Validation metrics with a fixed generator: the loss and, always, the denoising CE."""
        B = ids.shape[0]
        tau = stratified_uniform(B, generator, ids.device)
        t = self.schedule.t(tau.double()).float()
        if self.uses_embedded_noise:
            out = self.net(None, tau, embedded=self.embedded_interpolant(ids, t, generator)).float()
            return denoising_metrics(out.log_softmax(-1), ids)
        noise = torch.randn(*ids.shape, self.vocab_size, generator=generator, device=ids.device)
        x = self.interpolate(ids, t, noise)
        return denoising_metrics(self.denoise(x, tau).clamp_min(1e-30).log(), ids)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        seq_len: int,
        steps: int,
        generator: torch.Generator | None = None,
        float64: bool = False,
        callback=None,
        known=None,
        mask=None,
        known_scale: float = 0.1,
        known_iters: int = 3,
        guide_weak: "FLM | None" = None,
        guide_weight: float = 0.0,
        reward=None,
        reward_scale: float = 0.1,
        reward_iters: int = 10,
        reward_temperature: float = 8.0,
        cond_mode: str | None = None,
        cfg_weight: float | None = None,
    ) -> torch.Tensor:
        """Draw token ids (num_samples, seq_len) with ``steps`` Euler steps.

        Args:
            known, mask: known token ids and the positions they fix (a prefix when ``mask``
                is None); kept exactly in the output (:func:`fmlm.guidance.known_tensors`).
                Besides the replacement of the known positions by their interpolant, the
                unknown positions are steered (``known_iters`` steps of ``known_scale``, as
                for a reward) by the gradient of Σ_known log D_t(z)[known token] through the
                softened look-ahead, so that the free positions agree with the known ones
                (replacement alone completes a phrase from its first token only 32–39% of
                the time on the phrases tasks at 8 and 32 steps; with it 94–100% at 8 steps).
                The step is per sampler step, so many steps push harder: at 32 steps a
                smaller ``known_scale`` (0.025) keeps more samples valid.
            guide_weak, guide_weight: autoguidance by a weaker FLM with weight w.
            reward: differentiable reward of soft sequences (B, L, V) -> (B,), steered by its
                gradient through the look-ahead D_t(z), softened to softmax(logits / T) with
                T = ``reward_temperature``, with ``reward_iters`` steps of ``reward_scale`` per
                sampler step (:class:`fmlm.guidance.Steering`).
            cond_mode: ``learned`` (the default for a model trained with ``train.cond_prob`` > 0):
                the known positions are their clean one-hot at every step, flagged as given, and
                nothing is steered; ``steer``: the replacement and steering above (the default
                otherwise; a conditioned model then runs as an unconditional one).
            cfg_weight: classifier-free guidance weight w (learned conditioning only; None: none, 0: the
                guided formula at w = 0, which is the conditional sampler bit for bit).
        """
        device = next(self.parameters()).device
        known, mask = known_tensors(known, mask, num_samples, seq_len, self.vocab_size, device)
        mode = conditioning_.resolve_mode(self, cond_mode, known)
        conditioning_.check_cfg(cfg_weight, mode)
        if mode == "learned":
            known_iters = 0
        if guide_weak is not None:
            if self.loss_type == "mse_velocity":
                raise ValueError("autoguidance needs a denoiser on the simplex (not loss=mse_velocity)")
            check_weak(self, guide_weak)
        steers = []
        if known is not None and known_iters > 0 and self.loss_type != "mse_velocity":
            steers.append(Steering(known_loglik(known, mask), known_scale, known_iters, update=~mask))
        if reward is not None:
            if self.loss_type == "mse_velocity" or reward_temperature <= 0:
                raise ValueError("reward guidance needs a denoiser on the simplex and reward_temperature > 0")
            steers.append(Steering(reward, reward_scale, reward_iters, update=None if mask is None else ~mask))
        noise = torch.randn(num_samples, seq_len, self.vocab_size, generator=generator, device=device)

        def denoiser(z, tau, temperature=1.0):
            if mode != "learned":
                return self.denoise(z, tau, guide_weak, guide_weight, temperature)
            z_u = None
            if cfg_weight is not None:  # the unconditional view: known positions on their interpolant, not flagged
                z_u = replace_known(z, known, mask, noise, self.schedule.t(tau[:1].double()))
            return self.denoise(z, tau, guide_weak, guide_weight, temperature, mask, cfg_weight, z_u)

        def lookahead(z, tau):
            return denoiser(z, tau, reward_temperature)

        D = euler_sample(
            denoiser if guide_weak is not None or mode == "learned" else self.denoise,
            noise,
            self.schedule,
            steps,
            dtype=torch.float64 if float64 else torch.float32,
            callback=callback,
            known=known,
            mask=mask,
            steer=chain(steers),
            lookahead=lookahead,
            clean_known=mode == "learned",
        )
        return D.argmax(-1)
