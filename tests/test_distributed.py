"""torchrun: two gloo ranks give the same run as one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fmlm.cli import main
from fmlm.distributed import grad_accumulation
from fmlm.errors import ConfigError
from fmlm.methods.flm import Strata, stratified_uniform


def test_grad_accumulation_from_global_batch():
    assert grad_accumulation(32, 0, 2) == (16, 1)
    assert grad_accumulation(32, 4, 2) == (4, 4)
    assert grad_accumulation(32, 16, 1) == (16, 2)
    with pytest.raises(ConfigError, match="multiple"):
        grad_accumulation(32, 5, 2)
    with pytest.raises(ConfigError, match="divisible"):
        grad_accumulation(33, 0, 2)


def test_times_are_stratified_over_the_global_batch():
    K, n = 4, 8
    parts = []
    for k in range(K):
        strata = Strata(k, K, torch.Generator().manual_seed(5))
        parts.append(stratified_uniform(n, torch.Generator().manual_seed(100 + k), strata=strata))
    taus = torch.sort(torch.cat(parts)).values
    # One offset, one grid of K*n points: consecutive gaps are exactly 1/(K n) (up to the wrap-around).
    gaps = torch.diff(taus)
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / (K * n)), atol=1e-6)
    assert len({round(float(p.min() * K * n) % 1, 5) for p in parts}) == 1  # same offset in every part


def _torchrun(args: list[str], tmp: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "fmlm.cli",
        *args,
    ]
    # A generous timeout: under load two ranks on two busy cores take many times the idle time.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr  # every rank destroys its process group before exiting
    json.loads(proc.stdout)  # rank 0 prints one summary; the other rank prints nothing


def _max_diff(a: Path, b: Path, name: str = "model.safetensors") -> float:
    sa, sb = load_file(str(a / name)), load_file(str(b / name))
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    """FLM: 2 ranks x micro-batch 16 (DDP, then FSDP2) == 1 process x 2 accumulation steps x 16,
    including a resume under torchrun; then distillation from that run under DDP."""
    common = [
        "tiny",
        "threads=1",
        "max_steps=6",
        "save_every=3",
        "eval_every=3",
        "log_every=1",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--quiet",
        "--no-samples",
    ]
    one, ddp, fsdp = tmp_path / "one", tmp_path / "ddp", tmp_path / "fsdp"
    assert main(["train", *common, "micro_batch_size=16", "--run-dir", str(one)]) == 0
    _torchrun(["train", *common, "max_steps=3", "--run-dir", str(ddp)], tmp_path)
    _torchrun(["train", *common, "--run-dir", str(ddp)], tmp_path)  # resumes at step 3
    _torchrun(["train", *common, "train.distributed=fsdp", "--run-dir", str(fsdp)], tmp_path)
    last = "checkpoints/step_00000006"
    for run in (ddp, fsdp):
        assert _max_diff(one / last, run / last) < 1e-6
        assert _max_diff(one / last, run / last, "ema.safetensors") < 1e-6
        assert _losses(run) == pytest.approx(_losses(one), rel=1e-6)

    dcommon = [
        "threads=1",
        "max_steps=2",
        "save_every=2",
        "eval_every=2",
        "distill.target_ema=0.5",
        "--quiet",
        "--no-samples",
        "--teacher",
        str(one),
    ]
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    assert main(["distill", *dcommon, "micro_batch_size=16", "--run-dir", str(d1)]) == 0
    _torchrun(["distill", *dcommon, "--run-dir", str(d2)], tmp_path)
    assert _max_diff(d1 / "checkpoints/step_00000002", d2 / "checkpoints/step_00000002") < 1e-6
