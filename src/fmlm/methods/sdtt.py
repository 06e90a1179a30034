r"""MDLM + SDTT: self-distillation through time (Deschenaux & Gulcehre, ICLR 2025).

An MDLM student learns to do in one sampling step what its teacher does in m (= 2) steps,
and the teacher is replaced by the student every round, so the number of steps halves per
round (:mod:`fmlm.methods.rounds`; the reference ``MultiRoundSDTT`` in jdeschena/sdtt goes
1024 → 8 steps in 7 rounds of 10k steps).

Target (the reference's ``_teacher_logprobs_on_mask``). Draw x, t and z_t ~ q_t(·|x) as in
MDLM training. The teacher runs m ancestral MDLM steps of size dt from z_t,

    t = t_0 > t_1 > … > t_m,  t_k = max(t − k·dt, 0),
    z_{t_{k+1}} ~ p_T(· | z_{t_k}),  recording log x̂_T(z_{t_k}, t_k) (B, L, V + 1) at each step,

and the target of a position that was masked in z_t is the teacher's prediction
log x̂_T(z_{t_k}, t_k)_l at the step k where that position was unmasked; a position still
masked after m steps takes the last step's prediction. The student's one-step prediction
log x̂_S(z_t, t) is matched to it on the masked positions of z_t only:

    L = E (1/#masked) Σ_{l: z_t^l = m} D( x̂_S(z_t, t)_l , target_l ),

D = KL(student ‖ teacher) by default (the reference's ``distill_mode=kl-bwd``; ``kl_fwd``
and ``mse``, the MSE on log-probabilities, are options). Unmasked positions carry over
under SUBS and have no loss. The distributions are compared over the V data tokens (the mask
column is −∞ in both). The student is a plain MDLM: it samples with MDLM's ancestral sampler
and loads like any MDLM run.

Differences from the reference, and why.

* The reference's m-step grid is ``linspace(t, t − m·dt, m)`` (for m = 2 the times t and
  t − 2·dt) with a step of dt from each, so its two teacher steps cover (t, t − dt) and
  (t − 2dt, t − 3dt), leaving a gap; here the m steps tile (t, t − m·dt) exactly, which is
  what "one student step = m teacher steps" means.
* Rounds: N_0 = ``distill.base_steps`` (64, the reference: 1024) and ``distill.rounds`` (6,
  the reference: 7 ending at 8 steps) so that the last round teaches one-step sampling,
  the regime the benches compare; the round length is the distillation budget over the
  rounds, the same step budget as the flow map's.
* The teacher's steps reuse MDLM's ancestral update with per-row times (the reference's
  ``_compute_ddpm_update``), with Gumbel-max draws from the trainer's generator, so a run is
  reproducible from its seed and resumes exactly.
"""

from __future__ import annotations

import copy

import torch

from fmlm.methods.flm import Strata, stratified_uniform
from fmlm.methods.mdlm import MDLM
from fmlm.methods.rounds import RoundsMixin, divergence
from fmlm.methods.sampling import gumbel_argmax


def ancestral_step(
    model: MDLM, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MDLM ancestral step from time t to s < t per row: returns (log x̂(z_t, t) (B, L, V + 1), z_s (B, L)).

    A masked position unmasks to token j with probability ((α_s − α_t)/(1 − α_t))·x̂_j and stays
    masked with probability (1 − α_s)/(1 − α_t); an unmasked one stays.
    """
    logp = model.log_probs(z, t.float())  # (B, L, V + 1)
    a_t, a_s = model.alpha(t.double()), model.alpha(s.double())
    unmask = ((a_s - a_t) / (1.0 - a_t)).clamp(0.0, 1.0)
    stay = ((1.0 - a_s) / (1.0 - a_t)).clamp(0.0, 1.0)
    log_q = logp + unmask.log().float()[:, None, None]
    log_q[..., model.mask_id] = stay.log().float()[:, None]
    draw = gumbel_argmax(log_q, generator)
    return logp, torch.where(z == model.mask_id, draw, z)


class SDTT(RoundsMixin, MDLM):
    """An MDLM student distilled from an MDLM teacher by self-distillation through time.

    Args:
        net: the student's backbone (a copy of the teacher's architecture).
        rounds, base_steps, teacher_steps, round_steps: see :mod:`fmlm.methods.rounds`;
            ``teacher_steps`` is m, the teacher steps one student step replaces.
        kind: the divergence ``kl_bwd`` | ``kl_fwd`` | ``mse``.
        **mdlm: :class:`fmlm.methods.mdlm.MDLM` options (``t_min``, ``time_conditioning``, ...).
    """

    def __init__(
        self,
        net,
        rounds: int = 6,
        base_steps: int = 64,
        teacher_steps: int = 2,
        round_steps: int = 1,
        kind: str = "kl_bwd",
        **mdlm,
    ):
        super().__init__(net, **mdlm)
        teacher = MDLM(copy.deepcopy(net), **mdlm)
        self._init_rounds(teacher, rounds, base_steps, teacher_steps, round_steps, kind)

    @torch.no_grad()
    def teacher_target(
        self, z: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The teacher's log x̂ for every position of z_t (B, L, V + 1), from m ancestral steps of size dt."""
        dt = self.step_size()
        cur, target, last = z, None, None
        for k in range(self.teacher_steps):
            tk = (t - k * dt).clamp_min(self.t_min)  # a row that reached 0 is fully unmasked already
            sk = (t - (k + 1) * dt).clamp_min(0.0)
            last, nxt = ancestral_step(self.teacher, cur, tk, sk, generator)
            # A position decoded at this step takes this step's prediction.
            target = last if target is None else torch.where((nxt != cur)[..., None], last, target)
            cur = nxt
        # Still masked after m steps (never decoded): the last step's prediction.
        return torch.where((cur == self.mask_id)[..., None], last, target)

    def loss(
        self, ids: torch.Tensor, generator: torch.Generator | None = None, strata: Strata | None = None
    ) -> tuple[torch.Tensor, dict]:
        """SDTT loss per masked position on ids (B, L). Returns (loss, metrics)."""
        B, L = ids.shape
        V = self.vocab_size
        t = self.t_min + (1.0 - self.t_min) * stratified_uniform(B, generator, ids.device, strata)  # (B,)
        z = self.corrupt(ids, t, generator)
        target = self.teacher_target(z, t.double(), generator)[..., :V]
        masked = z == self.mask_id  # (B, L)
        # Only masked positions: the copied ones have −∞ log-probabilities (NaN gradients through where).
        student = self.log_probs(z, t)[..., :V][masked]  # (N, V)
        per = divergence(student, target[masked], self.divergence)  # (N,)
        loss = per.sum() / masked.sum().clamp_min(1)
        return loss, {"loss": loss.detach(), **self.round_metrics()}
