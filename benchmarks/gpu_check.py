"""GPU check: training tokens/s and peak memory at the largest batch that fits, and sampling speed.

Run through ``benchmarks/gpu_check.sh`` (about 10 minutes on one H200; ``--tiny`` is the
CPU mode the test suite runs in a minute). Parts, each in fresh processes:

1. Training, the paper's shape (DiT-small, V = 50,257, L = 1,024, bf16 autocast on the GPU):
   FLM with V-space and with embedded noise, FMLM semigroup distillation, MDLM. For each, the
   largest batch of ``--batches`` (tried from the largest down; an out-of-memory error moves to
   the next) is timed with ``fmlm bench train``'s worker, compile off; then compile on at that
   batch.
2. Sampling at L = 1,024: ``fmlm bench speed`` for FMLM one step (lean and reference) and AR
   with its KV cache, compile off and on.

Writes ``gpu_check.json`` and ``gpu_check.md`` in ``--out`` (default docs/results/gpu).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("flm-vocab", "flm-embedded", "fmlm", "mdlm")


def _is_oom(err: BaseException) -> bool:
    return "out of memory" in str(err).lower()


def worker(spec: dict) -> dict:
    """Largest batch that fits (first of ``batches`` whose steps run), then its measurement."""
    import torch

    from fmlm.bench.throughput import worker as measure

    tried = []
    for b in spec["batches"]:
        args = dict(spec["args"], batch=b)
        try:
            out = measure({"name": spec["name"], "args": args})
            out["batch"] = b
            out["tried"] = tried
            return out
        except (RuntimeError, MemoryError) as e:
            if not _is_oom(e) and not isinstance(e, MemoryError):
                raise
            tried.append({"batch": b, "error": "out of memory"})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return {"config": spec["name"], "error": "no batch size fits", "tried": tried}


def _run_worker(name: str, args: dict, batches: list[int], env: dict) -> dict:
    spec = json.dumps({"name": name, "args": args, "batches": batches})
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"config": name, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="benchmarks/gpu_check.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="tiny CPU mode (tests): tiny model, V=64, L=32, no compile")
    p.add_argument("--out", default="docs/results/gpu")
    p.add_argument("--batches", default="128,64,32,16,8,4,2,1", help="training batch sizes to try, largest first")
    p.add_argument("--sample-batches", default="1,8,32", help="sampling batch sizes")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--no-compile", action="store_true", help="skip the compile-on runs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    t_start = time.time()
    if a.tiny:
        size, vocab, seq_len, device, steps = "tiny", 64, 32, "cpu", 1
        batches, sample_shape, compile_runs = [4, 2], "tiny:64:32:1,2", [False]
    else:
        size, vocab, seq_len, device, steps = "dit-small", 50_257, 1024, "auto", a.steps
        batches = [int(b) for b in a.batches.split(",")]
        sample_shape = f"dit-small:50257:1024:{a.sample_batches}"
        compile_runs = [False] if a.no_compile else [False, True]
    env = dict(os.environ)
    if a.tiny:
        env["OMP_NUM_THREADS"] = "1"
    base = {
        "vocab": vocab,
        "seq_len": seq_len,
        "size": size,
        "steps": steps,
        "warmup": 1,
        "repeats": 1,
        "device": device,
        "threads": 1 if a.tiny else 0,
        "precision": "auto",
        "compile": False,
    }
    train = []
    for name in CONFIGS:
        r = _run_worker(name, base, batches, env)
        r["compile"] = False
        train.append(r)
        print(
            f"[gpu_check] train {name}: {r.get('tokens_per_s', float('nan')):,.0f} tokens/s at batch "
            f"{r.get('batch')} ({time.time() - t_start:.0f} s)",
            file=sys.stderr,
        )
    for name, r in zip(CONFIGS, list(train)):
        if True in compile_runs and "batch" in r:
            c = _run_worker(name, dict(base, compile=True), [r["batch"]], env)
            c["compile"] = True
            train.append(c)
    sampling = []
    out = Path(a.out)
    for comp in compile_runs:
        sdir = out / ("speed-compile" if comp else "speed")
        cmd = (
            [
                sys.executable,
                "-m",
                "fmlm.cli",
                "bench",
                "speed",
                "--shape",
                sample_shape,
                "--methods",
                "fmlm,fmlm-ref,ar",
                "--repeats",
                "2",
                "--min-seconds",
                "0",
                "--device",
                device,
                "--out",
                str(sdir),
                "--no-plot",
            ]
            + (["--threads", "1", "--gemm", "256"] if a.tiny else [])
            + (["--compile"] if comp else [])
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sampling.append({"compile": comp, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            sampling.append({"compile": comp, **json.loads((sdir / "speed.json").read_text())})
        print(f"[gpu_check] sampling, compile {comp} ({time.time() - t_start:.0f} s)", file=sys.stderr)
    result = {
        "tiny": a.tiny,
        "shape": {"size": size, "vocab": vocab, "seq_len": seq_len},
        "train": train,
        "sampling": sampling,
        "seconds": time.time() - t_start,
    }
    try:
        import torch

        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() and not a.tiny else "cpu"
    except Exception:  # pragma: no cover
        result["device"] = "unknown"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "gpu_check.md").write_text(md + "\n")
    print(md)
    return 0 if all("error" not in r for r in train + sampling) else 1


def markdown(result: dict) -> str:
    s = result["shape"]
    lines = [
        f"GPU check on {result['device']}: {s['size']}, V = {s['vocab']:,}, L = {s['seq_len']:,}, "
        f"{result['seconds']:.0f} s in all",
        "",
        "| config | compile | batch | tokens/s | peak MiB | precision |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["train"]:
        if "error" in r:
            lines.append(f"| {r['config']} | {r.get('compile')} | - | error: {r['error']} | - | - |")
        else:
            lines.append(
                f"| {r['config']} | {r['compile']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
                f"{r['peak_mib']:,.0f} | {r['precision']} |"
            )
    lines += ["", "| sampler | compile | batch | ms / sample | samples/s | utilisation |", "|---|---|---|---|---|---|"]
    for sm in result["sampling"]:
        if "error" in sm:
            lines.append(f"| - | {sm['compile']} | - | error: {sm['error']} | - | - |")
            continue
        for row in sm["shapes"][0]["rows"]:
            lines.append(
                f"| {row['method']} | {sm['compile']} | {row['batch']} | "
                f"{row['seconds_per_sample'] * 1e3:,.2f} | {row['samples_per_s']:,.3g} | "
                f"{row['utilisation']:.0%} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
