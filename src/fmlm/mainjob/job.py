"""The main job's two stages in order, each resuming, then the side-by-side and summary.json."""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from fmlm.errors import ConfigError, FmlmError
from fmlm.mainjob.compare import find_scorer, format_report, scorer_installed, side_by_side
from fmlm.mainjob.plan import Budget, JobProgress, job_objective, stage1_config, stage2_overrides, stage_dirs


def _stage_record(stage: int, method: str, summary: dict, wall: float | None) -> dict:
    rec = {
        "stage": stage,
        "method": method,
        "run_dir": summary["run_dir"],
        "step": summary["step"],
        "train_seconds": summary["train_seconds"],
        "wall_seconds": None if wall is None else round(wall, 2),
    }
    rec.update({k: v for k, v in summary.items() if k.startswith("val_")})
    return rec


def _finished(stage: int, method: str, summary: dict) -> str:
    val = "".join(f", {k} {v:.4f}" for k, v in summary.items() if k.startswith("val_"))
    what = "stopped (interrupted)" if summary["interrupted"] else "done"
    return (
        f"stage {stage} ({method}) {what}: step {summary['step']}, {summary['train_seconds'] / 60:.1f} min of "
        f"training{val}; {summary['run_dir']}"
    )


def _final_summary(run_dir: Path, ckpt_dir: Path) -> dict:
    """A final stage's summary, read from its last checkpoint's trainer state (the stage is not reopened)."""
    from fmlm import checkpoint as ckpt

    state = ckpt.read_json(ckpt_dir / "trainer_state.json")
    out = {
        "run_dir": str(run_dir),
        "step": state.get("step", 0),
        "tokens": state.get("tokens", 0),
        "train_seconds": round(float(state.get("elapsed", 0.0)), 2),
        "interrupted": False,
        **state.get("last_val", {}),
    }
    return out


def run(
    cfg,
    run_dir: str | Path | None = None,
    restart: bool = False,
    progress: bool = True,
    log=None,
    compare: bool = True,
    scorer: str = "auto",
    budget: Budget | None = None,
) -> dict:
    """Run (or resume) the two-stage job of ``cfg`` and return its summary (see the module docstring).

    ``compare=False`` skips the side-by-side; ``scorer`` is ``auto`` (the first installed of
    :data:`AUTO_SCORERS`), ``none`` or a scorer name (:func:`fmlm.bench.scorers.load_scorer`).
    """
    from fmlm import checkpoint as ckpt
    from fmlm.io import write_json
    from fmlm.train import Trainer, archive_run, check_run_dir
    from fmlm.train.distill import apply_distill_defaults, distill_config

    log = log or (lambda msg: None)
    objective = job_objective(cfg.train.method)
    if objective is None:
        raise ConfigError(f"method {cfg.train.method!r} is a single stage: use fmlm train")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"method={cfg.train.method} runs its two stages in one process; under torchrun train "
            "method=flm, then fmlm distill --teacher RUN"
        )
    budget = budget or Budget(cfg.train.max_minutes, cfg.train.max_steps)
    run1, run2 = stage_dirs(cfg, run_dir)
    cfg1 = stage1_config(cfg, budget)
    # The distillation's config is checked now, not after stage 1 has trained.
    apply_distill_defaults(copy.deepcopy(cfg1), stage2_overrides(cfg, budget, 0.0))
    display = JobProgress(
        budget,
        enabled=progress,
        compare_steps=cfg.sample.steps,
        batch_size=cfg.train.batch_size,
        scoring=compare and cfg.data.dataset != "phrases" and scorer_installed(scorer),
    )
    say = display.write if progress else log
    try:
        if restart:
            check_run_dir(run2)
            archive_run(run2, say)  # first, so that a rerun after a kill in stage 1 cannot skip stage 1

        def stage(k: int, cfg_k, run_k: Path, **kw) -> dict:
            """Train (or resume) stage ``k``; its trainer summary and the wall seconds of this session."""
            t0 = time.perf_counter()
            trainer = Trainer(cfg_k, run_k, progress=False, log=say, on_step=display.on_step, **kw)
            display.begin(k, trainer)
            summary = trainer.fit()
            display.draw(force=True)
            walls[k - 1] = time.perf_counter() - t0
            say(_finished(k, cfg_k.train.method, summary))
            return summary

        walls: list[float | None] = [None, None]
        if not ckpt.list_checkpoints(run2):
            s1 = stage(1, cfg1, run1, restart=restart)
            if s1["rank"] != 0 or s1["interrupted"]:
                return {**s1, "main_job": {"method": cfg.train.method, "interrupted": s1["interrupted"], "stage": 1}}
            teacher = ckpt.resolve(run1)
        else:  # stage 2 has started: stage 1 is final, and the teacher is the checkpoint it started from
            teacher = _started_teacher(run2)
            say(f"stage 1 is final: stage 2 in {run2} has started from {teacher}")
            s1 = _final_summary(run1, ckpt.resolve(teacher))
        display.steps[0] = s1["step"]
        display.end_stage1(s1["train_seconds"])
        cfg2, tokenizer = distill_config(None, stage2_overrides(cfg, budget, s1["train_seconds"]), teacher=teacher)
        s2 = stage(2, cfg2, run2, tokenizer=tokenizer)
    finally:
        display.close()
    job = {
        "method": cfg.train.method,
        "interrupted": s2["interrupted"],
        "budget": {
            **asdict(budget),
            "stage1_minutes": budget.stage1_minutes,
            "stage2_steps": budget.stage2_steps,
            "stage2_minutes": cfg2.train.max_minutes,
        },
        "stages": [_stage_record(1, "flm", s1, walls[0]), _stage_record(2, objective, s2, walls[1])],
        "run_dirs": [str(run1), str(run2)],
        "summary_path": str(run1 / "summary.json"),
    }
    summary = {**s1, "rank": s2["rank"], "world_size": s2["world_size"], "main_job": job}
    if s2["rank"] != 0 or s2["interrupted"]:
        return summary
    if compare:
        summary["main_job"]["side_by_side"] = _compare(cfg.sample.steps, run2, teacher, scorer, log=say)
    write_json(run1 / "summary.json", summary)
    return summary


def _started_teacher(run2: Path) -> Path:
    """The teacher checkpoint a started distillation run was given (its config.json, which the trainer
    writes before its first step, or failing that its newest valid checkpoint's)."""
    from fmlm import checkpoint as ckpt

    source = run2 / "config.json"
    if not source.is_file():
        found, _ = ckpt.newest_valid(run2, deep=False)
        if found is None:
            raise FmlmError(
                f"{run2} has checkpoints but no config.json and no valid checkpoint; rerun with "
                "--restart to start both stages over (the old runs are archived)"
            )
        source = found / "config.json"
    teacher = ckpt.read_json(source).get("distill", {}).get("teacher", "")
    if not teacher:
        raise FmlmError(f"{run2} is not a distillation run (no distill.teacher in {source}); use another --run-dir")
    return Path(teacher)


def _compare(flow_steps: int, run2: Path, teacher: Path, scorer_name: str, log) -> dict:
    from fmlm.api import load
    from fmlm.data.load import load_data

    flow_map = load(run2)
    flow = load(teacher, device=flow_map.device)
    t0 = time.perf_counter()
    scorer, note = (None, "the phrases task has no scorer") if flow.task is not None else find_scorer(scorer_name, log)
    load_seconds = time.perf_counter() - t0
    data = load_data(flow.config, tokenizer=flow.tokenizer)
    log(
        f"sampling the side-by-side: the flow map at 1 step, the flow at {flow_steps} Euler steps"
        + (f"; then scoring both and held-out text under {scorer.name}" if scorer is not None else "")
    )
    out = side_by_side(flow_map, flow, flow_steps, scorer=scorer, reference_blocks=data.val)
    out["seconds"]["load_scorer"] = load_seconds
    if note:
        out["scorer_note"] = note
    return out


def cmd_main_job(cfg, args) -> int:
    """``fmlm train`` with a two-stage method: run the job, print the side-by-side and the JSON summary."""
    import json

    progress = not args.quiet
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    summary = run(cfg, args.run_dir, restart=args.restart, progress=progress, log=log, compare=not args.no_samples)
    if summary.get("rank", 0) != 0:
        return 130 if summary["main_job"]["interrupted"] else 0
    print(json.dumps(summary, indent=2))
    if progress and "side_by_side" in summary["main_job"]:
        print(format_report(summary), file=sys.stderr)
    return 130 if summary["main_job"]["interrupted"] else 0
