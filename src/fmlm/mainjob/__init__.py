"""The two-stage main job: train the flow (FLM), distil its one-step flow map, show both side by side.

``fmlm train`` on a config whose ``train.method`` is ``flm+semigroup`` (the default
Shakespeare preset's; also ``flm+lagrangian`` and ``flm+eulerian``, on any preset) runs

1. stage 1, the FLM, in ``RUN`` (``runs/<preset>`` or ``--run-dir``), exactly as
   ``fmlm train method=flm`` would, on its share of the budget;
2. stage 2, the distillation, in ``RUN-<objective>``, exactly as
   ``fmlm distill --teacher RUN method=<objective>`` would, on the rest;

then samples the same seeds with the flow map at one step and the flow at ``sample.steps``
Euler steps, times both in this process, scores both per byte when a scorer is installed,
and writes the summary to ``RUN/summary.json`` (the stage-1 summary plus ``main_job``).

The budget (``train.max_minutes`` of training time over all sessions, ``train.max_steps``
stage-1 steps) is split by :class:`Budget`. Each stage resumes like any run (and never
silently starts over: the resume and ``--restart`` rules of :class:`fmlm.train.Trainer`
apply to both). Once stage 2 has a checkpoint, stage 1 is final: a rerun resumes stage 2 from
the teacher checkpoint it started from (a larger ``max_minutes`` goes to the flow map).
"""

from fmlm.mainjob.compare import find_scorer, format_report, scorer_installed, side_by_side
from fmlm.mainjob.job import cmd_main_job, run
from fmlm.mainjob.plan import (
    AUTO_SCORERS,
    CARRIED_KEYS,
    COMPARE_ROUNDS,
    COMPARE_SAMPLES,
    DISTILL_SHARE,
    DISTILL_STEP_COST,
    DISTILL_STEP_RATIO,
    ENTROPY_TOLERANCE,
    SHOW_SAMPLES,
    Budget,
    JobProgress,
    _clock,
    job_objective,
    stage1_config,
    stage2_overrides,
    stage_dirs,
)
