"""``fmlm bench speed``: sampling time per sample and FLOP utilisation against this machine's matmul peak.

For each shape (backbone size, vocabulary V, length L, batch sizes; random weights, or
a checkpoint with ``--ckpt``) and each batch size B, every sampler is timed in this one
process, interleaved round by round (the best round is kept, all rounds are in the JSON):

* ``fmlm``      FMLM one step, the lean path (embedded initial noise, argmax of the logits);
* ``fmlm-ref``  FMLM one step, the reference path ((B, L, V) Gaussian, V-space input, softmax);
* ``flm``       FLM, N Euler steps;  ``mdlm``, ``duo``: N steps;
* ``ar``        AR ancestral sampling with its KV cache (L passes of one position).

Network FLOPs are counted exactly by ``torch.utils.flop_counter`` over one full sampler
call (with the math SDPA kernel so that attention is counted too), keeping only what runs
inside the backbone module: everything the network computes (for the reference path its
V-space input product) and nothing of the sampler around it. Utilisation is the achieved
network FLOP/s divided by the matmul FLOP/s of this machine, measured in the same process,
at the same thread count and dtype, by timing a large square GEMM (best of several, before
and after the shape's measurements; the higher is used). The load average (``os.getloadavg``)
is recorded beside every timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fmlm.bench.flops import _sync, analytic_flops, count_network_flops, profile_breakdown
from fmlm.bench.speed_report import METHODS, markdown, plot
from fmlm.errors import ConfigError
from fmlm.io import write_json, write_text

DEFAULT_SHAPES = ("mini:87:128:1,4,16,64,256", "mini:4096:128:1,4,16,64", "dit-small:50257:1024:1,2")
_TRAIN_METHOD = {"fmlm": "semigroup", "fmlm-ref": "semigroup", "flm": "flm", "mdlm": "mdlm", "duo": "duo", "ar": "ar"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shape",
        action="append",
        default=None,
        metavar="SIZE:V:L:B1,B2,...",
        help="backbone size, vocabulary, length and batch sizes (repeatable; default: "
        + " ".join(DEFAULT_SHAPES)
        + ")",
    )
    p.add_argument(
        "--ckpt",
        default=None,
        help="time this checkpoint's method instead of random weights (one shape: its V and L; batches from --batches)",
    )
    p.add_argument("--batches", default="1,4,16", help="batch sizes with --ckpt")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=8, help="N, the steps of FLM, MDLM and Duo")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (the best is reported)")
    p.add_argument(
        "--min-seconds", type=float, default=0.3, help="each timing repeats the call until this much time has passed"
    )
    p.add_argument("--gemm", type=int, default=2048, help="side of the square GEMM that measures the peak")
    p.add_argument("--device", default="auto", help="cpu, cuda (default: best available)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's choice)")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPUs), fp32, bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbones (after counting FLOPs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-speed", help="folder for speed.json, speed.md and speed.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--count",
        default="counter",
        choices=("counter", "analytic"),
        help="network FLOPs from torch.utils.flop_counter over one call (exact; slow for AR at "
        "L = 1,024 on a CPU), or from the closed form (fmlm, fmlm-ref, flm, duo and ar; "
        "checked against the counter in the tests); analytic skips that untimed call",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile FMLM one step and AR at their best batch size: where the time goes",
    )


def parse_shape(text: str) -> dict:
    parts = text.split(":")
    try:
        size, vocab, seq_len, batches = parts
        out = {
            "size": size,
            "vocab": int(vocab),
            "seq_len": int(seq_len),
            "batches": [int(b) for b in batches.split(",") if b.strip()],
        }
    except ValueError:
        raise ConfigError(f"bad --shape {text!r} (expected SIZE:V:L:B1,B2,..., e.g. mini:87:128:1,16)") from None
    if out["vocab"] < 2 or out["seq_len"] < 1 or not out["batches"] or min(out["batches"]) < 1:
        raise ConfigError(f"bad --shape {text!r}: V >= 2, L >= 1 and batch sizes >= 1 needed")
    return out


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - platforms without a load average
        return float("nan")


def measure_peak(n: int, dtype, device, repeats: int = 5) -> dict:
    """FLOP/s of an n x n x n GEMM (2n³ FLOPs), best of ``repeats`` after one warm-up."""
    import torch

    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    (a @ b)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"gemm": n, "dtype": str(dtype).replace("torch.", ""), "flop_per_s": 2 * n**3 / best, "load": _load()}


def _models(shape: dict, methods: list[str], device, ckpt: str | None):
    """name -> (method module, backbone) at the shape, random weights unless ``ckpt``."""
    import torch

    from fmlm.config import build_config
    from fmlm.methods import build_method

    if ckpt is not None:
        from fmlm.api import load

        model = load(ckpt, device=device)
        name = {"semigroup": "fmlm", "lagrangian": "fmlm", "eulerian": "fmlm"}.get(
            model.config.train.method, model.config.train.method
        )
        names = ["fmlm", "fmlm-ref"] if name == "fmlm" else [name]
        return {n: (model.method, model.method.net) for n in names if n in methods}
    out = {}
    built: dict[str, object] = {}
    for name in methods:
        method = _TRAIN_METHOD[name]
        if method not in built:
            cfg = build_config("tiny", [f"model.size={shape['size']}", f"train.method={method}"])
            cfg.model.vocab_size = shape["vocab"]
            cfg.model.max_seq_len = shape["seq_len"]
            torch.manual_seed(0)
            m = build_method(cfg).to(device).eval()
            with torch.no_grad():  # random weights everywhere (adaLN-zero would make every block the identity)
                for p in m.parameters():
                    if p.dim() > 0 and not bool(p.any()):
                        p.normal_(0, 0.02)
            built[method] = m
        m = built[method]
        out[name] = (m, m.net)
    return out


def _sampler(name: str, method, B: int, L: int, steps: int, seed: int, device):
    import torch

    def call():
        g = torch.Generator(device).manual_seed(seed)
        if name == "fmlm":
            return method.sample(B, L, 1, generator=g)
        if name == "fmlm-ref":
            return method.sample(B, L, 1, generator=g, noise="vocab")
        if name == "ar":
            return method.sample(B, L, generator=g)
        return method.sample(B, L, steps, generator=g)

    return call


def time_call(call, device, min_seconds: float) -> tuple[float, int]:
    """Seconds per call (the mean over as many calls as fill ``min_seconds``, at least one)."""
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        call()
        n += 1
        _sync(device)
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return dt / n, n


def run_shape(shape: dict, args, device, amp, progress) -> dict:
    import contextlib

    import torch

    methods = [m for m in args.methods_list]
    models = _models(shape, methods, device, args.ckpt)
    methods = [m for m in methods if m in models]
    dtype = amp or torch.float32
    peaks = [measure_peak(args.gemm, dtype, device)]
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext
    L = shape["seq_len"]
    cells: dict[tuple[str, int], dict] = {}
    for name in methods:  # FLOPs (and the warm-up) before any compilation
        method, net = models[name]
        for B in shape["batches"]:
            if getattr(args, "count", "counter") == "analytic":
                c = analytic_flops(name, net, B, L, args.steps)
                with ctx():  # the untimed warm-up that counting would have been
                    _sampler(name, method, B, L, args.steps, args.seed, device)()
            else:
                with ctx():
                    c = count_network_flops(_sampler(name, method, B, L, args.steps, args.seed, device), net)
            cells[(name, B)] = {"method": name, "batch": B, **c, "seconds": [], "calls": [], "load": []}
            progress.update(1)
    if args.compile:
        for name in methods:
            models[name][1].compile()
        for name in methods:
            for B in shape["batches"]:
                with ctx():
                    _sampler(name, models[name][0], B, L, args.steps, args.seed, device)()
    for _ in range(args.repeats):  # interleaved rounds: every sampler sees the same conditions
        for name in methods:
            method, _net = models[name]
            for B in shape["batches"]:
                with ctx():
                    sec, n = time_call(
                        _sampler(name, method, B, L, args.steps, args.seed, device), device, args.min_seconds
                    )
                cell = cells[(name, B)]
                cell["seconds"].append(sec)
                cell["calls"].append(n)
                cell["load"].append(_load())
                progress.update(1)
    peaks.append(measure_peak(args.gemm, dtype, device))
    peak = max(p["flop_per_s"] for p in peaks)
    rows = []
    for cell in cells.values():
        best = min(cell["seconds"])
        i = cell["seconds"].index(best)
        flops_s = cell["network_flops"] / best
        steps = 1 if cell["method"].startswith("fmlm") else (L if cell["method"] == "ar" else args.steps)
        rows.append(
            {
                **cell,
                "seconds_per_call": best,
                "seconds_per_sample": best / cell["batch"],
                "samples_per_s": cell["batch"] / best,
                "passes": steps,
                "network_flop_per_s": flops_s,
                "utilisation": flops_s / peak,
                "load_at_best": cell["load"][i],
            }
        )
    if getattr(args, "profile", False):
        for name in ("fmlm", "ar"):
            cand = [r for r in rows if r["method"] == name]
            if cand:
                best_row = max(cand, key=lambda r: r["utilisation"])
                with ctx():
                    best_row["profile"] = profile_breakdown(
                        _sampler(name, models[name][0], best_row["batch"], L, args.steps, args.seed, device), device
                    )
    return {
        "shape": shape,
        "peaks": peaks,
        "peak_flop_per_s": peak,
        "rows": rows,
        "parameters": {name: sum(p.numel() for p in models[name][1].parameters()) for name in methods},
    }


def summarise(shape_result: dict) -> dict:
    """Best utilisation of each method over batch sizes, and the one-step lean/reference ratio per batch."""
    rows = shape_result["rows"]
    best = {}
    for r in rows:
        if r["method"] not in best or r["utilisation"] > best[r["method"]]["utilisation"]:
            best[r["method"]] = {"batch": r["batch"], "utilisation": r["utilisation"]}
    by = {(r["method"], r["batch"]): r for r in rows}
    lean = {
        B: by[("fmlm-ref", B)]["seconds_per_sample"] / by[("fmlm", B)]["seconds_per_sample"]
        for (m, B) in by
        if m == "fmlm" and ("fmlm-ref", B) in by
    }
    ar = {
        B: by[("ar", B)]["seconds_per_sample"] / by[("fmlm", B)]["seconds_per_sample"]
        for (m, B) in by
        if m == "fmlm" and ("ar", B) in by
    }
    out = {"best": best, "lean_speedup": lean, "fmlm_vs_ar": ar}
    if "fmlm" in best:
        out["fmlm_goal_met"] = best["fmlm"]["utilisation"] >= 0.5
    if "ar" in best:
        out["ar_goal_met"] = best["ar"]["utilisation"] >= 0.3
    return out


def run(args: argparse.Namespace) -> int:
    import platform

    import torch
    from tqdm.auto import tqdm

    from fmlm.runtime import autocast_dtype, pick_device

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ConfigError(f"unknown sampler {bad[0] if bad else args.methods!r} (choose from {', '.join(METHODS)})")
    args.methods_list = names
    for key in ("steps", "repeats", "gemm"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key} must be >= 1")
    if args.min_seconds < 0:
        raise ConfigError("--min-seconds must be >= 0")
    if args.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"unknown --precision {args.precision!r} (auto, fp32, bf16)")
    if args.ckpt is not None:
        from fmlm.api import load

        cfg = load(args.ckpt, device="cpu").config
        shapes = [
            {
                "size": cfg.model.size,
                "vocab": cfg.model.vocab_size,
                "seq_len": cfg.model.max_seq_len,
                "batches": parse_shape(f"x:2:1:{args.batches}")["batches"],
            }
        ]
    else:
        shapes = [parse_shape(s) for s in (args.shape or DEFAULT_SHAPES)]
        from fmlm.config import MODEL_SIZES

        for s in shapes:
            if s["size"] not in MODEL_SIZES:
                raise ConfigError(f"unknown model size {s['size']!r} (choose from {', '.join(MODEL_SIZES)})")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = pick_device(args.device)
    amp = autocast_dtype(args.precision, device)
    total = sum(len(s["batches"]) * len(names) * (1 + args.repeats) for s in shapes)
    settings = {
        k: getattr(args, k)
        for k in ("steps", "repeats", "min_seconds", "gemm", "device", "precision", "compile", "seed", "ckpt")
    }
    settings.update(
        threads=torch.get_num_threads(),
        device=str(device),
        dtype=str(amp or torch.float32),
        torch=torch.__version__,
        machine=platform.machine(),
        load_start=_load(),
    )
    results = []
    with tqdm(total=total, desc="bench speed", unit="cell", dynamic_ncols=True) as bar:
        for s in shapes:
            r = run_shape(s, args, device, amp, bar)
            r["summary"] = summarise(r)
            results.append(r)
    settings["load_end"] = _load()
    result = {"settings": settings, "shapes": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    write_json(out / "speed.json", result)
    write_text(out / "speed.md", table + "\n")
    if not args.no_plot:
        plot(result, out / "speed.png")
    print(table)
    print(f"wrote {out / 'speed.json'} and {out / 'speed.md'}", file=sys.stderr)
    return 0
