r"""Duo + DCD: discrete consistency distillation of a uniform-state model (Sahoo et al., 2025, §5).

The duality. Duo's uniform-state process is the argmax of a Gaussian diffusion on the
one-hot data: with ε ~ N(0, I_V) and the interpolant w_t̃ = (1 − t̃)·ε + t̃·onehot(x),

    argmax(w_t̃) ~ q_t(·|x)   when  α_t = T(t̃),

T the decoding-error map of :class:`fmlm.schedule.DecodingErrorSchedule` (see
:mod:`fmlm.methods.duo`; α_t = 1 − t here). The Gaussian side has a deterministic
probability-flow (DDIM) trajectory: given x and ε, w_s = (1 − t̃_s)·ε + t̃_s·onehot(x) for
every s. Its argmax is a *coupled* pair of uniform-state latents (z_t, z_s) with the right
marginals at both times, which the discrete process alone does not have.

DCD (Duo's Algorithm 2; reference ``Distillation`` in s-sahoo/duo). Draw x, ε and a time
t, set s = t − dt, and train the student's clean-data prediction at (z_t, t) to agree with
the teacher's at (z_s, s) on the same trajectory:

    L = E_{x, ε, t} (1/L) Σ_l  D( x̂_student(z_t, t)_l , x̂_teacher(z_s, s)_l ),
    z_t = argmax w_t̃(t),  z_s = argmax w_t̃(s),

D = KL(student ‖ teacher) by default (the reference's ``loss_type=kl-bwd``; ``kl_fwd`` and
``mse`` on log-probabilities are options). The time is drawn as the reference does: u
stratified over [t_min, 1), t = min(u + dt, 1), s = t − dt (a fraction dt of the batch sits
at t = 1, the start of one-step sampling). The student starts as a copy of the teacher and the
teacher is replaced by the student every round, while dt_r = 2^r / N_0 doubles
(:mod:`fmlm.methods.rounds`). The student is a plain Duo: it samples with Duo's ancestral
sampler (greedy tail), evaluates its NELBO, and loads like any Duo run.

The argmax in O(1) per position. Only three numbers per position decide argmax(w) at every
t̃ on a trajectory: ε_x, the largest of the other V − 1 coordinates M = max_{j≠x} ε_j, and
its index j*. With r = t̃/(1 − t̃),

    argmax(w_t̃) = x  if ε_x + r > M,  else  j*.

M is drawn exactly by inversion, M = Φ⁻¹(U^{1/(V−1)}) (the CDF of a maximum of n i.i.d.
normals is Φⁿ), and j* is uniform over the V − 1 other tokens (exchangeability). So a batch
costs (B, L) random numbers instead of the reference's (B, L, V) Gaussian tensor, which
matters at V = 50k; the law of (z_t, z_s) is the same.

Differences from the reference, and why.

* Time: the reference parameterises the Gaussian by log-SNR γ ∈ [γ_min, γ_max] = [−4, −1]
  and maps it to α through Duo's integral; here the time is Duo's own USDM time t ∈ [0, 1]
  (α_t = 1 − t, the schedule our Duo trains on) and the Gaussian time is t̃ = T⁻¹(α_t), so
  the teacher and student are queried exactly at the times they were trained at. s is kept
  ≥ t_min (the reference clips t to [0, 1] only).
* Rounds: the reference uses ``update_teacher_every=10000``, T = 512 and 5 rounds (50k steps,
  dt up to 16/512). Here the round length is the distillation budget over ``distill.rounds``
  (6 by default) and N_0 = ``distill.base_steps`` (64), so dt grows to 32/64: the rounds are
  stretched to end at the few-step regime the benches measure, on the same step budget as the
  flow map.
* The argmax is drawn exactly as above instead of materialising ε (same law).
"""

from __future__ import annotations

import torch

from fmlm.methods.duo import Duo
from fmlm.methods.flm import Strata, stratified_uniform
from fmlm.methods.rounds import RoundsMixin, divergence


def coupled_latents(
    ids: torch.Tensor, r_t: torch.Tensor, r_s: torch.Tensor, vocab_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, z_s) = argmax of w = ε + r·onehot(x) at two SNR ratios r = t̃/(1 − t̃) with one shared ε.

    Args:
        ids: clean ids x (B, L).
        r_t, r_s: (B,) ratios t̃/(1 − t̃) ≥ 0 (∞ allowed: the clean token).
        vocab_size: V ≥ 2.

    Returns:
        Two (B, L) id tensors on the same deterministic Gaussian trajectory.
    """
    V = vocab_size
    shape, dev = ids.shape, ids.device
    eps_x = torch.randn(shape, generator=generator, device=dev, dtype=torch.float64)
    u = torch.rand(shape, generator=generator, device=dev, dtype=torch.float64).clamp_min(1e-300)
    # M = Φ⁻¹(U^{1/(V−1)}) = −Φ⁻¹(1 − U^{1/(V−1)}), with 1 − U^{1/n} = −expm1(log U / n) kept accurate.
    m = -torch.special.ndtri(-torch.expm1(u.log() / (V - 1)))
    other = (ids + 1 + torch.randint(V - 1, shape, generator=generator, device=dev)) % V
    z_t = torch.where(eps_x + r_t.double()[:, None] > m, ids, other)
    z_s = torch.where(eps_x + r_s.double()[:, None] > m, ids, other)
    return z_t, z_s


class DCD(RoundsMixin, Duo):
    """A Duo student distilled from a Duo teacher by discrete consistency distillation.

    Args:
        net: the student's backbone (a copy of the teacher's architecture).
        rounds, base_steps, teacher_steps, round_steps: see :mod:`fmlm.methods.rounds`.
        kind: the divergence ``kl_bwd`` | ``kl_fwd`` | ``mse``.
        schedule: the decoding-error schedule for V (built when not given).
        **duo: :class:`fmlm.methods.duo.Duo` options (``t_min``, ``greedy_tail``, ``greedy_of``).
    """

    def __init__(
        self,
        net,
        rounds: int = 6,
        base_steps: int = 64,
        teacher_steps: int = 2,
        round_steps: int = 1,
        kind: str = "kl_bwd",
        schedule=None,
        **duo,
    ):
        import copy

        from fmlm.schedule import DecodingErrorSchedule

        super().__init__(net, **duo)
        self.schedule = schedule or DecodingErrorSchedule(net.vocab_size)
        teacher = Duo(copy.deepcopy(net), **duo)
        self._init_rounds(teacher, rounds, base_steps, teacher_steps, round_steps, kind)

    def snr_ratio(self, t: torch.Tensor) -> torch.Tensor:
        """r = t̃/(1 − t̃) of the Gaussian time t̃ = T⁻¹(α_t) dual to the USDM time t (B,), float64."""
        tg = self.schedule.t(self.alpha(t.double()).clamp(0.0, 1.0))
        return tg / (1.0 - tg)  # 1/0 = ∞ at α = 1: the clean token

    def loss(
        self, ids: torch.Tensor, generator: torch.Generator | None = None, strata: Strata | None = None
    ) -> tuple[torch.Tensor, dict]:
        """DCD loss per position on ids (B, L). Returns (loss, metrics)."""
        B, L = ids.shape
        dt = self.step_size()
        u = self.t_min + (1.0 - self.t_min) * stratified_uniform(B, generator, ids.device, strata).double()
        t = (u + dt).clamp(max=1.0)
        s = (t - dt).clamp(min=self.t_min)
        z_t, z_s = coupled_latents(ids, self.snr_ratio(t), self.snr_ratio(s), self.vocab_size, generator)
        with torch.no_grad():
            log_teacher = self.teacher.log_xhat(z_s, s.float())  # (B, L, V)
        log_student = self.log_xhat(z_t, t.float())
        loss = divergence(log_student, log_teacher, self.divergence).mean()
        return loss, {"loss": loss.detach(), **self.round_metrics()}
