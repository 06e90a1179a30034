r"""Uniform-state discrete diffusion, Duo (Sahoo et al., 2025; the UDLM ELBO of Schiff et al., 2025).

Forward process, per position and independently, with α_t = 1 − t (α_0 = 1: clean,
α_1 = 0: uniform noise):

    q_t(z | x) = Cat(α_t·x + (1 − α_t)/V · 1),   i.e.  q_t(y | x) = x̄_y / V,  x̄ = V·α_t·x + (1 − α_t)·1.

From s to t > s it is q(z_t | z_s) = Cat(α_{t|s}·z_s + (1 − α_{t|s})/V·1),
α_{t|s} = α_t/α_s, so its jump rate from any y to any z ≠ y is −α'_t/(V·α_t).

Model. The network predicts x̂ = x_θ(z_t, t) = softmax(logits) over V and the
reverse process plugs x̂ into the posterior, q(z_s | z_t, x̂) with

    q(z_s = j | z_t, x) ∝ [α_{t|s}·δ_{j, z_t} + (1 − α_{t|s})/V] · [α_s·x_j + (1 − α_s)/V],     (*)

which is a proper distribution for any probability vector x (the normaliser,
α_t·x_{z_t} + (1 − α_t)/V, is linear in x). Letting s → t gives the model's
reverse jump rates, and the true reverse rates conditional on x:

    R_θ(z → y) = (−α'_t/(V·α_t)) · x̄θ_y / x̄θ_z,    R(z → y | x) = (−α'_t/(V·α_t)) · x̄_y / x̄_z,

with x̄θ = V·α_t·x̂ + (1 − α_t)·1.

NELBO. For continuous-time Markov chains, −log p_θ(x) is bounded by the KL
between the path measures of the conditional reverse process and the model
(Campbell et al., 2022). The prior term vanishes (q_1 and p_1 are both uniform)
and so does the reconstruction term (α_0 = 1), leaving

    NELBO(x) = ∫_0^1 E_{z_t ~ q_t(·|x)} Σ_l c_t Σ_y r_y·φ(log r̂_y − log r_y) dt,
    c_t = −α'_t/(V·α_t),  r_y = x̄_y/x̄_{z}, r̂_y = x̄θ_y/x̄θ_{z},  φ(w) = e^w − 1 − w ≥ 0,

(per position l, z = z_t^l), since R̂ − R + R·log(R/R̂) = c·r·φ(log r̂ − log r).
The y = z term is zero (r = r̂ = 1), so the sum runs over the whole vocabulary
without exclusion. Expanding Σ_y r̂_y = V/x̄θ_z and Σ_y r_y = V/x̄_z gives the
UDLM form  c_t·[V/x̄θ_z − V/x̄_z + Σ_y (x̄_y/x̄_z)·log(x̄_y·x̄θ_z/(x̄_z·x̄θ_y))].
It is ≥ 0 and zero iff x̄θ ∝ x̄ on every y, i.e. x̂ = x (the model knows the
clean token). For the log-linear schedule c_t = 1/(V·(1 − t)). The loss is
NELBO/L (nats per token), t stratified over [t_min, 1).

What the network learns: the bound is tight (NELBO(x) = −log p(x)) when R_θ is
the data's reverse rate, c·p_t(z^{l←y})/p_t(z). Since p_t(z_l = y | z_{−l}) =
q_t(y | p(x_l | z_{−l})), the optimal x̂ for position l is p(x_l | z_{−l}, t), the
clean-token posterior given the *other* noisy tokens, not the posterior mean
E[x_l | z_t] (which double-counts z_l's own evidence once plugged into (*)).
``tests/test_baselines.py`` checks both facts by exact enumeration on a
two-sequence distribution: that oracle reaches the data entropy to 10⁻⁸, a
uniform model gives exactly L·log V, and random models stay above.

Sampler (ancestral): uniform grid 1 = t_0 > … > t_N = 0, z_{t_0} uniform, then
z_s ~ (*) with x̂ = x_θ(z_t, t) at every step. At s = 0 (α_s = 1) this draws
from x̂ reweighted by the last state. With ``greedy_tail`` (Duo's greedy noise
removal) the last step takes the mode instead of a sample. Duo's reference takes
argmax x̂ (``greedy_of="xhat"``); by default we take the mode of the last step's
own distribution (*) at s = 0, argmax_j x̂_j·(V·α_t·δ_{j,z} + 1 − α_t)
(``greedy_of="posterior"``). They differ because the optimal x̂ is
p(x_l | z_{−l}) (above), which leaves out z_l's evidence; (*) puts it back. One
step draws every position independently from x̂(uniform noise): the
factorisation error (there α_t = 0 and both greedy modes are argmax x̂).

Curriculum (optional, ``curriculum_steps > 0``; Duo §4.1). The uniform-state
process is the argmax of Gaussian diffusion: with w = (1 − t̃)·ε + t̃·onehot(x),
ε ~ N(0, I_V), argmax(w) has exactly the law q_t(·|x) when α_t = T(t̃), where T
is the decoding-error map τ(t̃) of :mod:`fmlm.schedule` (P[argmax = x] =
α + (1 − α)/V; the other tokens are exchangeable). During the first
``curriculum_steps`` training steps the network reads the relaxed tokens
softmax(w/T_c) (B, L, V) through its linear input layer instead of onehot(z_t),
with z_t = argmax(w) in the NELBO, and the temperature T_c anneals geometrically
from 0.1 to 0.01 (the reference's 10⁻¹ → 10⁻²). Simplification: the reference
also restricts the Gaussian log-SNR to a window during the curriculum; here t
keeps its full range.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fmlm import conditioning as conditioning_
from fmlm.methods.base import nelbo_metrics
from fmlm.methods.flm import Strata, stratified_uniform
from fmlm.methods.sampling import gumbel_argmax, sampler_setup
from fmlm.paths import interpolant


def uniform_nelbo_terms(
    log_xhat: torch.Tensor, x: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, dalpha: torch.Tensor
) -> torch.Tensor:
    """The uniform-state NELBO integrand per position: c_t·Σ_y r_y·φ(log r̂_y − log r_y).

    Args:
        log_xhat: log x̂ (B, L, V), the model's log-probabilities of the clean token.
        x: clean ids (B, L).
        z: noisy ids z_t (B, L).
        alpha: α_t (B,), in (0, 1) (pass float64 when t is tiny).
        dalpha: α'_t (B,), ≤ 0.

    Returns:
        (B, L) non-negative terms in the dtype of ``log_xhat`` (use float64 for exact checks).
    """
    B, L, V = log_xhat.shape
    dt = log_xhat.dtype
    # Per-row scalars in float64 first: in float32, α = 1 − t rounds to 1 for t < 6e-8 and
    # log(1 − α) would be −inf.
    a = alpha.double()
    log_va = torch.log(V * a).to(dt)[:, None, None]  # (B, 1, 1)
    log_1ma = torch.log1p(-a).to(dt)[:, None, None]
    log_top = torch.log(V * a + 1.0 - a).to(dt)[:, None, None]
    # log x̄θ_y = log(V·α·x̂_y + (1 − α)), computed as a log-sum-exp for stability.
    log_bar_theta = torch.logaddexp(log_va + log_xhat, log_1ma.expand_as(log_xhat))  # (B, L, V)
    # log x̄_y for one-hot x: log(V·α + 1 − α) at y = x, log(1 − α) elsewhere.
    onehot = F.one_hot(x, V).to(torch.bool)
    log_bar = torch.where(onehot, log_top, log_1ma)  # (B, L, V)
    zi = z[..., None]
    log_r = log_bar - log_bar.gather(-1, zi)  # (B, L, V)
    log_rhat = log_bar_theta - log_bar_theta.gather(-1, zi)
    w = log_rhat - log_r
    phi = (torch.expm1(w) - w).clamp_min(0.0)  # e^w − 1 − w ≥ 0; clamp rounding noise
    c = (-dalpha.double() / (V * a)).to(dt)[:, None]  # (B, 1)
    return c * (log_r.exp() * phi).sum(-1)


class Duo(nn.Module):
    """Wraps a DiT over V tokens as a uniform-state diffusion language model.

    Args:
        net: backbone ``net(x, t) -> logits (B, L, V)``; x is ids (B, L) or vectors (B, L, V).
        t_min: smallest training/validation time (keeps log(1 − α_t) finite).
        greedy_tail: the last sampling step takes the mode instead of a sample.
        greedy_of: ``"posterior"`` (mode of the last step's distribution (*)) or
            ``"xhat"`` (argmax x̂, Duo's reference).
        curriculum_steps: number of initial training steps with the Gaussian-relaxed
            input (0 = off). Counted by :meth:`on_step_end` (the trainer calls it after
            each optimiser step) in a persistent buffer, so it survives resume.
        curriculum_schedule: the decoding-error schedule for V (built on demand when
            the curriculum is on and none is given).
        cond: training-time conditioning (:class:`fmlm.conditioning.Conditioning`; None: none):
            the given positions are never corrupted, carry no loss and are flagged by the
            backbone's given embedding.
    """

    def __init__(
        self,
        net: nn.Module,
        t_min: float = 1e-3,
        greedy_tail: bool = True,
        greedy_of: str = "posterior",
        curriculum_steps: int = 0,
        curriculum_schedule=None,
        cond: conditioning_.Conditioning | None = None,
    ):
        super().__init__()
        self.cond = cond
        if not 0.0 < t_min < 1.0:
            raise ValueError("t_min must be in (0, 1)")
        if greedy_of not in ("posterior", "xhat"):
            raise ValueError(f"greedy_of must be 'posterior' or 'xhat', got {greedy_of!r}")
        self.greedy_of = greedy_of
        if curriculum_steps < 0:
            raise ValueError("curriculum_steps must be >= 0")
        self.net = net
        self.t_min = t_min
        self.greedy_tail = greedy_tail
        self.curriculum_steps = curriculum_steps
        self.curriculum_schedule = curriculum_schedule
        if curriculum_steps > 0:
            self.register_buffer("curriculum_step", torch.zeros((), dtype=torch.long))
            if curriculum_schedule is None:
                from fmlm.schedule import DecodingErrorSchedule

                self.curriculum_schedule = DecodingErrorSchedule(net.vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.net.vocab_size

    # ------------------------------------------------------------------ schedule
    @staticmethod
    def alpha(t: torch.Tensor) -> torch.Tensor:
        """α_t = 1 − t (log-linear)."""
        return 1.0 - t

    @staticmethod
    def dalpha(t: torch.Tensor) -> torch.Tensor:
        """α'_t = −1."""
        return -torch.ones_like(t)

    def corrupt(self, ids: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z_t ~ q_t(·|x): keep x with probability α_t, otherwise a uniform token (possibly x again)."""
        keep = torch.rand(ids.shape, generator=generator, device=ids.device) < self.alpha(t)[:, None]
        noise = torch.randint(self.vocab_size, ids.shape, generator=generator, device=ids.device)
        return torch.where(keep, ids, noise)

    def relaxed(
        self, ids: torch.Tensor, t: torch.Tensor, temperature: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian-relaxed tokens for the curriculum: (softmax(w/T) (B, L, V), z_t = argmax w (B, L))."""
        t_gauss = self.curriculum_schedule.t(self.alpha(t).double()).to(torch.float32)[:, None, None]  # (B, 1, 1)
        eps = torch.randn(*ids.shape, self.vocab_size, generator=generator, device=ids.device)
        w = interpolant(ids, t_gauss[:, 0, 0], eps)  # (B, L, V): the Gaussian path at time t_gauss
        return (w / temperature).softmax(-1), w.argmax(-1)

    def _curriculum_temperature(self) -> float | None:
        """The relaxation temperature now, or None once the curriculum is over (or off)."""
        if self.curriculum_steps == 0 or not self.training:
            return None
        step = int(self.curriculum_step)
        if step >= self.curriculum_steps:
            return None
        frac = step / self.curriculum_steps
        return 10.0 ** (-1.0 - frac)  # 0.1 -> 0.01, geometric

    # ------------------------------------------------------------------ loss
    def log_xhat(self, x_in: torch.Tensor, t: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
        """log x_θ (B, L, V) in float32; x_in is ids (B, L) or relaxed vectors (B, L, V); ``given``
        (B, L) flags the known positions (learned conditioning)."""
        return self.net(x_in, t, **conditioning_.net_kw(given)).float().log_softmax(-1)

    def nelbo_given(
        self,
        ids: torch.Tensor,
        z: torch.Tensor,
        t: torch.Tensor,
        net_input: torch.Tensor | None = None,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The NELBO integrand at (t, z_t) summed over positions, (B,). Average over t ~ U[0,1], z_t ~ q_t.

        ``given``: the known positions are flagged to the network and left out of the sum."""
        log_xhat = self.log_xhat(z if net_input is None else net_input, t, given)
        t64 = t.double()  # the schedule's scalars in float64 (see uniform_nelbo_terms)
        terms = uniform_nelbo_terms(log_xhat, ids, z, self.alpha(t64), self.dalpha(t64))
        return (terms if given is None else terms * (~given)).sum(-1)

    def _nelbo(
        self,
        ids: torch.Tensor,
        generator: torch.Generator | None,
        temperature: float | None,
        strata: Strata | None = None,
    ) -> torch.Tensor:
        B, L = ids.shape
        # t in [t_min, 1): stratified across the batch; the integrand vanishes as t -> 1.
        t = self.t_min + (1.0 - self.t_min) * stratified_uniform(B, generator, ids.device, strata)
        if self.cond is not None and self.training:
            return self._conditioned_nelbo(ids, t, generator, temperature)
        if temperature is None:
            z = self.corrupt(ids, t, generator)
            return self.nelbo_given(ids, z, t).mean() / L
        x_in, z = self.relaxed(ids, t, temperature, generator)
        return self.nelbo_given(ids, z, t, net_input=x_in).mean() / L

    def _conditioned_nelbo(self, ids, t, generator, temperature) -> torch.Tensor:
        """The NELBO per free token of a batch with given positions (never corrupted, flagged, no loss)."""
        B, L = ids.shape
        if temperature is None:
            x_in, z = None, self.corrupt(ids, t, generator)
        else:
            x_in, z = self.relaxed(ids, t, temperature, generator)
        given = self.cond.draw(B, L, generator, ids.device)
        z = torch.where(given, ids, z)
        if x_in is not None:
            x_in = torch.where(given[..., None], F.one_hot(ids, self.vocab_size).to(x_in.dtype), x_in)
        return self.nelbo_given(ids, z, t, x_in, given).sum() / (~given).sum().clamp_min(1)

    def loss(
        self, ids: torch.Tensor, generator: torch.Generator | None = None, strata: Strata | None = None
    ) -> tuple[torch.Tensor, dict]:
        """NELBO per token on ids (B, L) (Gaussian-relaxed input during the curriculum)."""
        temperature = self._curriculum_temperature()
        loss = self._nelbo(ids, generator, temperature, strata)
        metrics = {"loss": loss.detach()}
        if self.curriculum_steps > 0 and self.training:
            metrics["curriculum_temperature"] = 0.0 if temperature is None else temperature
        return loss, metrics

    def on_step_end(self) -> None:
        """Called by the trainer after every optimiser step: advances the curriculum."""
        if self.curriculum_steps > 0:
            self.curriculum_step += 1

    @torch.no_grad()
    def eval_loss(self, ids: torch.Tensor, generator: torch.Generator) -> dict:
        """Validation NELBO per token (always with discrete input) and the perplexity bound exp(NELBO)."""
        return nelbo_metrics(self._nelbo(ids, generator, None).item())

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        seq_len: int,
        steps: int,
        generator: torch.Generator | None = None,
        float64: bool = False,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        greedy_tail: bool | None = None,
        known=None,
        mask=None,
        cond_mode: str | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling from uniform noise with ``steps`` network passes on a uniform t grid.

        Args:
            num_samples, seq_len: output shape (B, L).
            steps: N ≥ 1 network passes.
            generator: source of randomness; the same seed gives the same ids.
            float64: posterior and Gumbel-max draws in float64.
            callback: called as ``callback(i, z_t, x̂)`` at every step, z_t (B, L), x̂ (B, L, V).
            greedy_tail: override the constructor's choice for the last step.
            known, mask: known token ids and their positions (a prefix when ``mask`` is None):
                clamped in the state before every step and in the output.
            cond_mode: ``learned`` (the default for a model trained with ``train.cond_prob`` > 0):
                the known positions are also flagged as given to the backbone; ``steer``: not
                (plain clamping, the only mode of a model trained without conditioning).
        """
        B, V = num_samples, self.vocab_size
        device, dtype, known, kmask = sampler_setup(self, B, seq_len, steps, float64, known, mask, V)
        given = kmask if conditioning_.resolve_mode(self, cond_mode, known) == "learned" else None
        greedy = self.greedy_tail if greedy_tail is None else greedy_tail
        z = torch.randint(V, (B, seq_len), generator=generator, device=device)  # z_1 ~ uniform

        def clamp(ids: torch.Tensor) -> torch.Tensor:
            return ids if known is None else torch.where(kmask, known, ids)

        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        for i in range(steps):
            t, s = ts[i].item(), ts[i + 1].item()
            a_t, a_s = 1.0 - t, 1.0 - s
            z = clamp(z)
            log_xhat = self.log_xhat(z, torch.full((B,), t, device=device), given).to(dtype)  # (B, L, V)
            if callback is not None:
                callback(i, z, log_xhat.exp())
            if i == steps - 1 and greedy and self.greedy_of == "xhat":
                return clamp(log_xhat.argmax(-1))
            # log of (*): [α_{t|s}·δ_{j,z} + (1 − α_{t|s})/V] · [α_s·x̂_j + (1 − α_s)/V], unnormalised.
            a_ts = a_t / a_s
            from_z = torch.full_like(log_xhat, math.log((1.0 - a_ts) / V) if a_ts < 1 else -math.inf)
            from_z.scatter_(-1, z[..., None], math.log(a_ts + (1.0 - a_ts) / V))
            to_x = torch.logaddexp(
                math.log(a_s) + log_xhat, torch.full_like(log_xhat, math.log((1.0 - a_s) / V) if a_s < 1 else -math.inf)
            )
            if i == steps - 1 and greedy:
                return clamp((from_z + to_x).argmax(-1))  # the mode of the last step's distribution
            z = gumbel_argmax(from_z + to_x, generator, float64)  # (B, L)
        return clamp(z)
