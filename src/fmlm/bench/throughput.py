"""``fmlm bench train``: training throughput and peak memory of FLM, FMLM and MDLM at equal size.

Every configuration runs in a fresh subprocess, one after the other, on synthetic
token ids (uniform over the vocabulary; speed and memory do not depend on the text):

* ``flm-vocab``     FLM with the reference V-space noise (``train.noise=vocab``);
* ``flm-embedded``  FLM with the embedded-noise path (``train.noise=embedded``);
* ``fmlm``          semigroup distillation of a (random) FLM teacher into a two-time student,
                    embedded noise drawn jointly for teacher and student;
* ``fmlm-ref``      the same distillation with the reference loss code (``FMLM(fused=False)``:
                    autograd through log_softmax, out-of-place targets and logit cap), the "before"
                    of the fused losses, in the same run;
* ``mdlm``          MDLM on the same backbone (V + 1 slots for the mask).

With ``--repeats R`` the configurations run in R interleaved rounds and the fastest round
of each is reported (the least disturbed by other load; all rounds are kept in the JSON).
Each runs ``warmup`` + ``steps`` full optimiser steps (AdamW, grad clipping, bf16 autocast
on GPUs as in training); tokens/s counts B·L tokens per step over the timed steps.

Peak memory. On CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). On CPU: the
process's peak resident set size (``ru_maxrss``) — everything the process touched,
including the Python interpreter and PyTorch's libraries — and, as ``step_peak_mib``,
its growth from just before the first step (model, optimiser object and batch built) to
the end: the activations, gradients, optimiser states and temporaries of training. A
fresh process per configuration keeps one configuration's high-water mark out of another's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fmlm.errors import ConfigError
from fmlm.io import write_json

CONFIGS = ("flm-vocab", "flm-embedded", "fmlm", "fmlm-ref", "mdlm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab", type=int, default=50_257, help="vocabulary size V (default: GPT-2's 50,257)")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length L")
    p.add_argument("--batch", type=int, default=1, help="batch size per step")
    p.add_argument("--size", default="tiny", help="backbone size (model.size; e.g. tiny, mini, dit-small)")
    p.add_argument("--steps", type=int, default=3, help="timed optimiser steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds over the configurations (interleaved, a fresh process each); "
        "the fastest round of each is reported",
    )
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--device", default="auto", help="cpu, cuda (default: best available)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's choice)")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPUs), fp32, bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--out", default="runs/bench-train", help="folder for bench.json and bench.md")


def _config(args, name: str):
    from fmlm.config import build_config

    method = {"flm-vocab": "flm", "flm-embedded": "flm", "fmlm": "semigroup", "fmlm-ref": "semigroup", "mdlm": "mdlm"}[
        name
    ]
    noise = "vocab" if name == "flm-vocab" else "embedded"
    cfg = build_config(
        "tiny",
        [
            f"model.size={args.size}",
            f"train.method={method}",
            f"train.noise={noise}",
            f"train.batch_size={args.batch}",
            f"data.seq_len={args.seq_len}",
            f"train.precision={args.precision}",
            f"train.compile={args.compile}",
        ],
    )
    cfg.model.vocab_size = args.vocab
    cfg.model.max_seq_len = args.seq_len
    if method == "semigroup":
        cfg.model.two_time = True
    return cfg


def _build(cfg, name: str, device):
    import dataclasses

    import torch

    from fmlm.methods import build_method
    from fmlm.methods.flow_map import FMLM

    torch.manual_seed(0)
    if name in ("fmlm", "fmlm-ref"):
        tcfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, two_time=False),
            train=dataclasses.replace(cfg.train, method="flm"),
        )
        teacher = build_method(tcfg).to(device)
        student = build_method(cfg)  # an untrained FMLM; take its backbone
        d = cfg.distill
        method = FMLM.from_teacher(
            teacher,
            student.net,
            objective="semigroup",
            diag_fraction=d.diag_fraction,
            boundary_fraction=d.boundary_fraction,
            mid=d.mid,
            noise="embedded",
            fused=name == "fmlm",
        )
        if name == "fmlm-ref":
            teacher.net.inplace_cap = student.net.inplace_cap = False
    else:
        method = build_method(cfg, training=True)  # train.noise decides the noise path
    method = method.to(device)
    if cfg.train.compile:
        method.net.compile()
    return method


def _maxrss_mib() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


def worker(spec: dict) -> dict:
    """Run one configuration in this process and return its measurements."""
    import math
    from types import SimpleNamespace

    import torch

    from fmlm.runtime import autocast_dtype, pick_device

    args = SimpleNamespace(**spec["args"])
    name = spec["name"]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = pick_device(args.device)
    cfg = _config(args, name)
    method = _build(cfg, name, device)
    amp = autocast_dtype(cfg.train.precision, device)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    gen = torch.Generator(device).manual_seed(0)
    ids = torch.randint(args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    params = sum(p.numel() for p in method.parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss, _ = method.loss(ids, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.parameters(), 1.0)
        opt.step()
        return float(loss)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = _maxrss_mib()
    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    sync()
    dt = time.perf_counter() - t0
    out = {
        "config": name,
        "parameters": params,
        "tokens_per_s": args.batch * args.seq_len * args.steps / dt,
        "seconds_per_step": dt / args.steps,
        "final_loss": losses[-1],
        "finite": all(map(math.isfinite, losses)),
        "device": str(device),
        "precision": str(amp or "fp32"),
    }
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["memory"] = "torch.cuda.max_memory_allocated"
    else:
        out["peak_mib"] = _maxrss_mib()
        out["step_peak_mib"] = out["peak_mib"] - rss0
        out["memory"] = "ru_maxrss (process peak RSS); step_peak = growth from just before the first step"
    return out


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad or not names:
        raise ConfigError(
            f"unknown bench configuration {bad[0] if bad else args.configs!r} (choose from {', '.join(CONFIGS)})"
        )
    for key in ("vocab", "seq_len", "batch", "steps", "repeats"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise ConfigError("--warmup must be >= 0")
    _config(args, "flm-vocab")  # validates --size and --precision before any subprocess starts
    keys = (
        "vocab",
        "seq_len",
        "batch",
        "size",
        "steps",
        "warmup",
        "repeats",
        "device",
        "threads",
        "precision",
        "compile",
    )
    spec_args = {k: getattr(args, k) for k in keys}
    env = dict(os.environ)
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = str(args.threads)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    # Round-robin: on a shared or throttling machine every configuration sees the same conditions.
    order = [n for _ in range(args.repeats) for n in names]
    for name in tqdm(order, desc="bench train", unit="run", dynamic_ncols=True):
        spec = json.dumps({"name": name, "args": spec_args})
        proc = subprocess.run(
            [sys.executable, "-m", "fmlm.bench.throughput", spec], capture_output=True, text=True, env=env
        )
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise ConfigError(f"bench configuration {name} failed: {tail[0]}")
        runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for name in names:
        best = dict(max(runs[name], key=lambda r: r["tokens_per_s"]))
        best["tokens_per_s_all"] = [r["tokens_per_s"] for r in runs[name]]
        best["tokens_per_s_median"] = statistics.median(best["tokens_per_s_all"])
        best["peak_mib_all"] = [r["peak_mib"] for r in runs[name]]
        rows.append(best)
    ref = next((r for r in rows if r["config"] == "mdlm"), None)
    for r in rows:
        if ref is not None:
            r["throughput_vs_mdlm"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["peak_vs_mdlm"] = r["peak_mib"] / ref["peak_mib"]
            if "step_peak_mib" in r:
                r["step_peak_vs_mdlm"] = r["step_peak_mib"] / max(ref["step_peak_mib"], 1e-9)
    result = {"settings": spec_args, "results": rows}
    if ref is not None:
        flm = next((r for r in rows if r["config"] == "flm-embedded"), None)
        if flm is not None:
            result["goal"] = {
                "throughput_ratio": flm["throughput_vs_mdlm"],
                "throughput_met": flm["throughput_vs_mdlm"] >= 0.95,
                "peak_ratio": flm["peak_vs_mdlm"],
                "peak_met": flm["peak_vs_mdlm"] <= 1.1,
            }
        fm = next((r for r in rows if r["config"] == "fmlm"), None)
        if fm is not None:
            result["distill_goal"] = {
                "throughput_ratio": fm["throughput_vs_mdlm"],
                "throughput_met": fm["throughput_vs_mdlm"] >= 0.6,
            }
            ref_fm = next((r for r in rows if r["config"] == "fmlm-ref"), None)
            if ref_fm is not None:
                result["distill_goal"]["speedup_vs_reference"] = fm["tokens_per_s"] / ref_fm["tokens_per_s"]
    table = markdown(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", result)
    (out / "bench.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}", file=sys.stderr)
    return 0


def markdown(result: dict) -> str:
    s = result["settings"]
    cpu = any("step_peak_mib" in r for r in result["results"])
    head = (
        f"V = {s['vocab']:,}, L = {s['seq_len']:,}, batch {s['batch']}, model {s['size']}, "
        f"{s['steps']} timed steps after {s['warmup']} warm-up, best of {s['repeats']} interleaved "
        f"rounds, threads {s['threads'] or 'default'}"
    )
    cols = ["config", "params (M)", "tokens/s", "× MDLM", "median tokens/s", "peak MiB", "× MDLM"]
    if cpu:
        cols += ["step peak MiB", "× MDLM"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["results"]:
        cells = [
            r["config"],
            f"{r['parameters'] / 1e6:.2f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r.get('throughput_vs_mdlm', float('nan')):.2f}",
            f"{r['tokens_per_s_median']:,.0f}",
            f"{r['peak_mib']:,.0f}",
            f"{r.get('peak_vs_mdlm', float('nan')):.2f}",
        ]
        if cpu:
            cells += [f"{r['step_peak_mib']:,.0f}", f"{r.get('step_peak_vs_mdlm', float('nan')):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    g = result.get("goal")
    if g:
        lines += [
            "",
            f"Goal (FLM embedded vs MDLM): throughput ≥ 0.95×: {'met' if g['throughput_met'] else 'NOT met'} "
            f"({g['throughput_ratio']:.2f}×); peak memory ≤ 1.1×: {'met' if g['peak_met'] else 'NOT met'} "
            f"({g['peak_ratio']:.2f}×)",
        ]
    g = result.get("distill_goal")
    if g:
        extra = (
            f"; {g['speedup_vs_reference']:.2f}× the reference loss code's tokens/s"
            if "speedup_vs_reference" in g
            else ""
        )
        lines += [
            "",
            f"Goal (FMLM semigroup distillation vs MDLM): throughput ≥ 0.6×: "
            f"{'met' if g['throughput_met'] else 'NOT met'} ({g['throughput_ratio']:.2f}×){extra}",
        ]
    return "\n".join(lines)


if __name__ == "__main__":  # the per-configuration subprocess
    print(json.dumps(worker(json.loads(sys.argv[1]))))
