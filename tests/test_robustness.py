"""Surviving kill -9 and Ctrl-C, and the non-finite step guard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fmlm.cli import main
from fmlm.config import build_config
from fmlm.errors import FmlmError
from fmlm.train import Trainer


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    out = {}
    for r in recs:
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r["loss"]
    return out


def _start(args: list[str], tmp: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "fmlm.cli", "train", *args],
        env=env,
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 1200.0) -> None:
    """Wait (polling the file system, generously) until ``path`` exists; fail early if ``proc`` died."""
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.fixture
def common(tmp_path):
    return [
        "tiny",
        "threads=1",
        "max_steps=80",
        "save_every=10",
        "log_every=1",
        "eval_every=1000",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--quiet",
        "--no-samples",
    ]


@pytest.mark.slow
def test_kill_9_then_rerun_matches_an_uninterrupted_run(tmp_path, common):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    # The killed run has no reachable end, so however slowly this test is scheduled, it is killed mid-way.
    proc = _start([*common, "max_steps=1000000", "--run-dir", str(killed)], tmp_path)
    _wait_for(killed / "checkpoints" / "step_00000020", proc)
    proc.send_signal(signal.SIGKILL)  # at whatever it is doing: a step, a log line or the next save
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    resumed_at = max(
        int(p.name[5:])
        for p in (killed / "checkpoints").iterdir()
        if p.name.startswith("step_") and (p / "manifest.json").is_file()
    )
    end = max(80, resumed_at + 20)  # the schedule is constant, so max_steps does not change the trajectory
    rerun = _start([*common, f"max_steps={end}", "--run-dir", str(killed)], tmp_path)  # the same command
    out, err = rerun.communicate(timeout=1800)
    assert rerun.returncode == 0, err[-2000:]
    assert "resumed from" not in out
    assert json.loads(out)["step"] == end
    assert main(["train", *common, f"max_steps={end}", "--run-dir", str(ref)]) == 0
    assert _losses(killed) == _losses(ref)  # every step, bit for bit
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == [f"step_{end - 10:08d}", f"step_{end:08d}"]  # keep_last = 2, no temporary directories left


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, common):
    run = tmp_path / "run"
    proc = _start([*common, "max_steps=1000000", "--run-dir", str(run)], tmp_path)  # cannot finish first
    _wait_for(run / "checkpoints" / "step_00000010", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    summary = json.loads(out)
    assert summary["interrupted"] is True
    step = summary["step"]
    assert (run / "checkpoints" / f"step_{step:08d}" / "manifest.json").is_file()
    assert main(["train", *common, f"max_steps={step + 5}", "--run-dir", str(run)]) == 0  # the same run carries on
    assert json.loads((run / "summary.json").read_text())["step"] == step + 5


def _sigint_in(obj, name: str, times: int = 1):
    """Make ``obj.name`` send this process SIGINT (``times`` times) on its first call, then do its work."""
    real = getattr(obj, name)
    calls = {"n": 0}

    def hooked(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)  # the Python handler runs in this thread, right here
        return real(*a, **k)

    setattr(obj, name, hooked)
    return calls


@pytest.mark.parametrize("phase", ["_forward_backward", "evaluate", "save"])
def test_ctrl_c_in_every_phase_of_training_stops_at_a_boundary_and_saves(tmp_path, phase):
    """SIGINT during a step, an evaluation or a checkpoint write: that work finishes, a checkpoint of
    the step reached is saved, fit() reports the interruption (the CLI then exits 130)."""
    from fmlm import checkpoint as ckpt

    tr = _trainer(tmp_path, "max_steps=1000", "eval_every=3", "save_every=4")
    _sigint_in(tr, phase)
    summary = tr.fit()
    assert summary["interrupted"] is True and summary["step"] < 1000
    ck = tmp_path / "run" / "checkpoints" / f"step_{summary['step']:08d}"
    ckpt.verify(ck)
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == summary["step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_second_ctrl_c_stops_at_once(tmp_path):
    tr = _trainer(tmp_path, "max_steps=1000")
    _sigint_in(tr, "_forward_backward", times=2)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_startup_exits_130_without_a_traceback(tmp_path, capsys, monkeypatch):
    import fmlm.train.loop

    _sigint_in(fmlm.train.loop, "load_data")
    code = main(
        [
            "train",
            "tiny",
            "threads=1",
            f"data.cache_dir={tmp_path / 'cache'}",
            "--quiet",
            "--no-samples",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and "Traceback" not in err


def _trainer(tmp_path, *overrides):
    cfg = build_config(
        "tiny",
        [
            "threads=1",
            "max_steps=6",
            "save_every=100",
            "eval_every=100",
            f"data.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ],
    )
    return Trainer(cfg, tmp_path / "run", progress=False, log=lambda *a: None)


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    tr = _trainer(tmp_path)
    real = tr.method.loss
    calls = {"n": 0}

    def flaky(ids, gen, strata=None):
        calls["n"] += 1
        loss, m = real(ids, gen, strata)
        if calls["n"] == 2:  # non-finite loss
            loss = loss * float("nan")
        if calls["n"] == 3:  # finite loss, non-finite gradient: d sqrt(x)/dx at 0
            loss = loss + (tr.method.net.embed.sum() * 0).sqrt()
        return loss, {**m, "loss": loss.detach()}

    tr.method.loss = flaky
    before = {k: v.clone() for k, v in tr.method.state_dict().items()}
    summary = tr.fit()
    assert summary["step"] == 6 and calls["n"] == 8  # two batches skipped, six steps taken
    assert all(torch.isfinite(v).all() for v in tr.method.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in tr.method.state_dict().items())
    logged = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all("grad_norm" in r for r in logged if "loss" in r)


def test_too_many_non_finite_steps_stop_with_a_clear_message(tmp_path):
    tr = _trainer(tmp_path, "max_bad_steps=3")
    real = tr.method.loss
    tr.method.loss = lambda ids, gen, strata=None: (lambda lm: (lm[0] * float("inf"), lm[1]))(real(ids, gen, strata))
    with pytest.raises(FmlmError, match="4 non-finite loss values in a row at step 0"):
        tr.fit()


def test_compile_switch_compiles_the_backbone(tmp_path):
    """train.compile=true wraps the backbone's forward in torch.compile (state-dict keys unchanged)."""
    plain, compiled = _trainer(tmp_path), _trainer(tmp_path / "c", "train.compile=true")
    assert getattr(plain.method.net, "_compiled_call_impl", None) is None
    assert compiled.method.net._compiled_call_impl is not None
    assert plain.method.state_dict().keys() == compiled.method.state_dict().keys()
