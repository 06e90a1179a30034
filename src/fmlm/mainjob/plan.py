"""The two-stage main job's plan: the stage names, the budget split between them, their configs,
and one progress line over both stages with a total ETA."""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fmlm.bench.report import ENTROPY_TOLERANCE  # noqa: F401  (re-exported: the benches' collapse rule)
from fmlm.errors import ConfigError

#: Share of the job's time budget that goes to distillation. The evidence: the full
#: ``fmlm bench shakespeare-cpu`` (docs/results/bench-shakespeare-cpu) trained its mini FLM for
#: 1,500 steps in 586 s and distilled the flow map for 800 steps in 478 s, i.e. 45 % of the time.
DISTILL_SHARE = 0.45
#: Distillation steps per stage-1 step when the step bound ends the run (the benches' 800 per 1,500).
DISTILL_STEP_RATIO = 800 / 1500
#: Stage-1 steps per distillation step in time (the same bench: 2.56 and 1.68 steps/s), for the ETA
#: before stage 2 has measured its own rate.
DISTILL_STEP_COST = 1.53
#: Samples (one batch, the same seed) in the side-by-side; timed rounds per sampler (the fastest counts; one
#: round of 128 Euler steps already takes about a minute on 2 loaded cores).
COMPARE_SAMPLES = 16
COMPARE_ROUNDS = 1
SHOW_SAMPLES = 3
#: Scorers tried, in order, when ``scorer="auto"`` (the first installed one is used).
AUTO_SCORERS = ("gemma-3-270m", "smollm2-135m")
#: Bookkeeping keys the distillation run takes from the job's config (they may change between sessions).
CARRIED_KEYS = (
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.save_every",
    "train.keep_last",
    "train.threads",
    "train.device",
    "data.cache_dir",
    "train.micro_batch_size",
    "train.distributed",
    "train.compile",
    "train.noise",
)


def job_objective(method: str) -> str | None:
    """The distillation objective of a two-stage method name (``flm+semigroup`` -> ``semigroup``),
    None for a single-stage method; ConfigError for a malformed one."""
    if "+" not in method:
        return None
    from fmlm.methods.flow_map import OBJECTIVES

    first, _, second = method.partition("+")
    if first != "flm" or second not in OBJECTIVES:
        raise ConfigError(
            f"unknown two-stage method {method!r} (choose from "
            f"{', '.join('flm+' + o for o in OBJECTIVES)}, or a single method such as flm)"
        )
    return second


@dataclass(frozen=True)
class Budget:
    """How the job's budget is split between the stages.

    ``max_minutes`` (0: no time bound) is the training time of both stages together and
    ``max_steps`` the FLM's steps. Stage 1 gets ``(1 − share)·max_minutes``; stage 2 what stage 1
    left of ``max_minutes`` (at least ``share·max_minutes``) and ``step_ratio·max_steps`` steps.
    """

    max_minutes: float
    max_steps: int
    share: float = DISTILL_SHARE
    step_ratio: float = DISTILL_STEP_RATIO

    @property
    def stage1_minutes(self) -> float:
        return (1.0 - self.share) * self.max_minutes if self.max_minutes > 0 else 0.0

    @property
    def stage2_steps(self) -> int:
        return max(1, math.ceil(self.step_ratio * self.max_steps))

    def stage2_minutes(self, stage1_seconds: float) -> float:
        if self.max_minutes <= 0:
            return 0.0
        return max(self.max_minutes - stage1_seconds / 60.0, self.share * self.max_minutes)


def stage_dirs(cfg, run_dir: str | Path | None) -> tuple[Path, Path]:
    """(stage-1 run directory, stage-2 run directory): ``RUN`` and its sibling ``RUN-<objective>``."""
    objective = job_objective(cfg.train.method)
    run1 = Path(run_dir) if run_dir else Path("runs") / cfg.preset
    return run1, run1.with_name(f"{run1.name}-{objective}")


def stage1_config(cfg, budget: Budget):
    """The FLM's config: the job's with ``method=flm`` and stage 1's share of the time."""
    c = copy.deepcopy(cfg)
    c.train.method = "flm"
    c.train.max_minutes = budget.stage1_minutes
    return c


def stage2_overrides(cfg, budget: Budget, stage1_seconds: float) -> list[str]:
    """``key=value`` of the distillation run on top of ``fmlm distill``'s defaults: its budget and
    the job's bookkeeping keys."""
    from fmlm.config import flatten

    flat = flatten(cfg.to_dict())
    out = [
        f"train.method={job_objective(cfg.train.method)}",
        f"train.max_steps={budget.stage2_steps}",
        f"train.max_minutes={budget.stage2_minutes(stage1_seconds)!r}",
    ]
    return out + [f"{k}={flat[k]}" for k in CARRIED_KEYS]


# ----------------------------------------------------------------------------- progress
def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "–"
    s = round(max(0.0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class JobProgress:
    """One progress line over both stages, toward whichever bound ends each stage (time or steps).

    The bar's fraction is training time done over done + left; what is left of each stage is the
    smaller of its time left and its steps left at its measured rate (stage 2, before it starts, at
    stage 1's rate divided by :data:`DISTILL_STEP_COST`), plus the side-by-side's sampling. On a
    terminal the line is redrawn in place (twice a second at most); otherwise it is printed as a
    plain line every 30 seconds.
    """

    def __init__(
        self,
        budget: Budget,
        enabled: bool = True,
        compare_steps: int = 128,
        batch_size: int = 32,
        stream=None,
        scoring: bool = False,
    ):
        self.budget, self.enabled, self.scoring = budget, enabled, scoring
        self.compare_steps, self.batch_size = compare_steps, batch_size
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if hasattr(self.stream, "isatty") else False
        self.interval = 0.5 if self.tty else 30.0
        self.stage, self.method = 0, ""
        self.done = [0.0, 0.0]  # training seconds of each stage (all sessions)
        self.steps = [0, 0]
        self.limits = [(budget.max_steps, budget.stage1_minutes * 60 or math.inf), (budget.stage2_steps, math.nan)]
        self.rate = [math.nan, math.nan]  # steps per training second, this session
        self._start = (0, 0.0)
        self._last_draw = -math.inf
        self._last_val_step = -1
        self._line = ""
        self.loss = math.nan

    def write(self, msg: str) -> None:
        """A log line above the progress line."""
        if self.enabled:
            self.stream.write(("\r\x1b[K" if self.tty and self._line else "") + msg + "\n")
            if self.tty and self._line:
                self.stream.write(self._line)
            self.stream.flush()

    def begin(self, stage: int, trainer) -> None:
        """Stage ``stage`` (1 or 2) starts (or resumes) with ``trainer``."""
        self.stage, self.method = stage, trainer.cfg.train.method
        t = trainer.cfg.train
        self.limits[stage - 1] = (t.max_steps, t.max_minutes * 60 if t.max_minutes > 0 else math.inf)
        st = trainer.state
        self.steps[stage - 1], self.done[stage - 1] = st.step, st.elapsed
        self._start = (st.step, st.elapsed)
        self._last_val_step = st.step
        self.loss = math.nan
        self.draw(force=True)

    def end_stage1(self, seconds: float) -> None:
        """Stage 1 is final at ``seconds`` of training: stage 2's time bound is now known."""
        self.done[0] = seconds
        self.limits[0] = (self.steps[0], seconds)
        self.limits[1] = (self.budget.stage2_steps, self.budget.stage2_minutes(seconds) * 60 or math.inf)

    def on_step(self, trainer, metrics: dict) -> None:
        st, k = trainer.state, self.stage - 1
        self.steps[k], self.done[k] = st.step, st.elapsed
        if st.elapsed > self._start[1] and st.step > self._start[0]:
            self.rate[k] = (st.step - self._start[0]) / (st.elapsed - self._start[1])
        if "loss" in metrics:
            self.loss = float(metrics["loss"])
        if st.step % trainer.cfg.train.eval_every == 0 and st.last_val and st.step != self._last_val_step:
            self._last_val_step = st.step
            self.write(
                f"stage {self.stage} ({self.method}) step {st.step}: "
                + ", ".join(f"{key} {v:.4f}" for key, v in st.last_val.items())
            )
        self.draw()

    def left(self) -> tuple[float, str]:
        """(estimated seconds left, the bound that ends the current stage: ``time`` or ``steps``)."""
        total, bound = 0.0, "steps"
        rate1 = self.rate[0]
        for k in range(max(self.stage - 1, 0), 2):
            max_steps, max_s = self.limits[k]
            if k == 1 and self.stage <= 1:  # stage 2 has not started: its budget follows stage 1's end
                max_s = self.budget.stage2_minutes(self.done[0] + total) * 60 or math.inf
            rate = self.rate[k] if math.isfinite(self.rate[k]) else (rate1 / DISTILL_STEP_COST if k == 1 else rate1)
            if self.steps[k] >= max_steps:
                by_steps = 0.0
            else:
                by_steps = (max_steps - self.steps[k]) / rate if rate and math.isfinite(rate) else math.inf
            by_time = max(0.0, max_s - self.done[k]) if math.isfinite(max_s) else math.inf
            if not (math.isfinite(by_steps) or math.isfinite(by_time)):
                return math.inf, bound
            if k == self.stage - 1:
                bound = "time" if by_time < by_steps else "steps"
            total += max(0.0, min(by_steps, by_time))
        return total + self.compare_seconds(), bound

    def compare_seconds(self) -> float:
        """The side-by-side's sampling, from stage 1's rate (a training step ~ three forward passes)."""
        if not math.isfinite(self.rate[0]) or self.rate[0] <= 0:
            return 0.0
        forward = 1.0 / (3.0 * self.rate[0] * self.batch_size)  # seconds per sample per network pass
        return COMPARE_ROUNDS * COMPARE_SAMPLES * (self.compare_steps + 1) * forward

    def status(self) -> str:
        """The progress line: stage, step, a bar over the whole job, loss, time trained, ETA."""
        done = sum(self.done)
        left, bound = self.left()
        frac = min(1.0, done / (done + left)) if math.isfinite(left) and done + left > 0 else 0.0
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        loss = f" loss {self.loss:.3f}," if math.isfinite(self.loss) else ""
        return (
            f"stage {self.stage}/2 {self.method} step {self.steps[self.stage - 1]} {100 * frac:3.0f}% [{bar}]"
            f"{loss} {_clock(done)} trained, ETA {_clock(left)}{' + scoring' if self.scoring else ''} "
            f"(stage {self.stage} ends on {bound})"
        )

    def draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last_draw < self.interval):
            return
        self._last_draw = now
        line = self.status()
        if self.tty:
            import shutil

            self._line = line[: max(20, shutil.get_terminal_size().columns - 1)]
            self.stream.write("\r\x1b[K" + self._line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._line:
            self.stream.write("\n")
            self.stream.flush()
        self._line = ""


# ----------------------------------------------------------------------------- side by side
