r"""Rounds of step halving with a frozen teacher: the machinery shared by DCD and SDTT.

Both distillations (:mod:`fmlm.methods.dcd`, :mod:`fmlm.methods.sdtt`) train a student that
starts as a copy of a trained discrete diffusion model (the teacher) and proceed in ``rounds``
of equal length. In round r = 0, 1, …, R − 1 the teacher's step is

    dt_r = m^r / N_0,

N_0 = ``base_steps`` (the teacher's original number of sampling steps) and m =
``teacher_steps`` (2: each round halves the number of steps). At the start of every round
after the first, the teacher is replaced by the student's current (raw, not EMA) weights,
as in both references (``update_teacher_every`` with ``teacher_ema=False`` in s-sahoo/duo,
``grow_dt_every`` with ``use_ema_on_growth=False`` in jdeschena/sdtt). After R rounds the
student makes one step of size m^R / N_0, i.e. it samples in N_0 / m^R steps.

State. The teacher is kept out of ``parameters()`` (the optimiser never sees it) but is saved
with the student under ``teacher.*`` keys, together with two buffers, ``distill_step`` (optimiser
steps so far, advanced by :meth:`RoundsMixin.on_step_end`) and ``round_steps`` (the round
length, fixed when the run starts). A resumed run therefore continues with the same teacher
and the same round, and raising ``train.max_steps`` on resume lengthens the last round rather
than moving the round boundaries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("kl_bwd", "kl_fwd", "mse")
_OWN = ("distill_step", "round_steps")


def divergence(log_student: torch.Tensor, log_teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position distance between two log-probability tensors (…, V) -> (…).

    ``kl_bwd``: KL(student ‖ teacher) (both references' default), ``kl_fwd``: KL(teacher ‖ student),
    ``mse``: mean over V of (log p_student − log p_teacher)² (SDTT's MSE on log-probabilities).
    """
    if kind == "kl_bwd":
        return (log_student.exp() * (log_student - log_teacher)).sum(-1)
    if kind == "kl_fwd":
        return (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    if kind == "mse":
        return F.mse_loss(log_student, log_teacher, reduction="none").mean(-1)
    raise ValueError(f"unknown divergence {kind!r} (choose from {', '.join(DIVERGENCES)})")


def _save_teacher(module, state_dict, prefix, local_metadata):
    for k, v in module.teacher.state_dict().items():
        state_dict[f"{prefix}teacher.{k}"] = v.detach()


def _load_teacher(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    head = f"{prefix}teacher."
    own = {k[len(head) :]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(head)]}
    missing, unexpected = module.teacher.load_state_dict(own, strict=False)
    missing_keys.extend(f"{head}{k}" for k in missing)
    unexpected_keys.extend(f"{head}{k}" for k in unexpected)


class RoundsMixin:
    """Teacher, round schedule and checkpointing for a distilled discrete diffusion model.

    The class using it is a subclass of the teacher's method class (``Duo``, ``MDLM``), so the
    student samples, evaluates and loads exactly like an undistilled model of that method.
    """

    def _init_rounds(
        self, teacher: torch.nn.Module, rounds: int, base_steps: int, teacher_steps: int, round_steps: int, kind: str
    ) -> None:
        if rounds < 1 or base_steps < 1 or teacher_steps < 2 or round_steps < 1:
            raise ValueError("need rounds >= 1, base_steps >= 1, teacher_steps >= 2 and round_steps >= 1")
        if teacher_steps**rounds > base_steps:
            raise ValueError(f"{rounds} rounds of factor {teacher_steps} from {base_steps} steps end below one step")
        if kind not in DIVERGENCES:
            raise ValueError(f"unknown divergence {kind!r} (choose from {', '.join(DIVERGENCES)})")
        self.rounds, self.base_steps, self.teacher_steps, self.divergence = rounds, base_steps, teacher_steps, kind
        teacher.load_state_dict(self.student_state())
        # Not registered: frozen, out of parameters() and of train()/eval(); saved by the hooks.
        object.__setattr__(self, "teacher", teacher.requires_grad_(False).eval())
        self.register_buffer("distill_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("round_steps", torch.tensor(round_steps, dtype=torch.long))
        self.register_state_dict_post_hook(_save_teacher)
        self.register_load_state_dict_pre_hook(_load_teacher)

    def _apply(self, fn, recurse=True):  # keep the unregistered teacher on the student's device/dtype
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)
        return self

    def student_state(self) -> dict[str, torch.Tensor]:
        """The student's weights as the undistilled method names them (no teacher, no counters)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.") and k not in _OWN}

    def load_student(self, state: dict[str, torch.Tensor]) -> None:
        """Start the student (and the teacher) from a trained model's weights."""
        own = self.student_state()
        missing = sorted(set(own) - set(state))
        if missing:
            raise KeyError(f"the teacher's weights lack {missing[0]}")
        for k in own:
            if own[k].shape != state[k].shape:
                raise KeyError(
                    f"the teacher's {k} has shape {tuple(state[k].shape)}, the student's {tuple(own[k].shape)}"
                )
        with torch.no_grad():
            for k, v in self.named_parameters():
                v.copy_(state[k])
        self.teacher.load_state_dict(self.student_state())

    @property
    def round(self) -> int:
        """The current round r (the last round continues past the planned budget)."""
        return min(int(self.distill_step) // max(int(self.round_steps), 1), self.rounds - 1)

    def step_size(self, r: int | None = None) -> float:
        """The teacher's step in round r: dt_r = m^r / N_0 (a fraction of the unit time range)."""
        r = self.round if r is None else r
        return self.teacher_steps**r / self.base_steps

    def student_steps(self, r: int | None = None) -> int:
        """The number of sampling steps the student learns in round r: N_0 / m^(r + 1)."""
        r = self.round if r is None else r
        return max(1, math.ceil(self.base_steps / self.teacher_steps ** (r + 1)))

    def on_step_end(self) -> None:
        """Called by the trainer after every optimiser step: count it; a new round takes the student as teacher."""
        self.distill_step += 1
        n, length = int(self.distill_step), int(self.round_steps)
        if n % length == 0 and n // length < self.rounds:
            self.teacher.load_state_dict(self.student_state())

    def round_metrics(self) -> dict:
        return {"round": float(self.round), "dt": self.step_size()}
