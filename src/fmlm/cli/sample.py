"""``fmlm sample``: text from a checkpoint, with conditioning and guidance flags."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from fmlm.errors import FmlmError

if TYPE_CHECKING:
    from fmlm.api import Model


def _report_samples(
    model, steps_list, num_samples, seed, float64, show=True, check=False, max_show=4, seq_len=None, **options
) -> list[dict]:
    results = []
    for steps in steps_list:
        t0 = time.perf_counter()
        out = model.generate(num_samples, steps, seed, float64=float64, seq_len=seq_len, **options)
        dt = time.perf_counter() - t0
        ids, texts = out.raw, out.texts
        rec = {"steps": steps, "num_samples": num_samples, "seed": seed, "seconds_per_sample": dt / num_samples}
        rec.update(lengths=[len(r) for r in out.ids], rejected=out.rejected, tries=out.tries)
        if check and model.task is not None and len(ids):
            m = model.task.check(ids)
            rec.update(valid_rate=m["valid_rate"], coverage=m["coverage"])
        if check and options.get("classifier") is not None and len(ids):  # reward guidance: share of the target class
            clf = options["classifier"]
            rec["target_rate"] = (clf.labels(ids) == clf.class_index(options.get("target"))).float().mean().item()
        rec["texts"] = texts[:max_show] if max_show else texts
        if show:
            head = f"--- {steps} steps, {rec['seconds_per_sample'] * 1e3:.2f} ms/sample"
            if "valid_rate" in rec:
                head += f", valid {rec['valid_rate']:.3f}, coverage {rec['coverage']:.3f}"
            if "target_rate" in rec:
                head += f", target {rec['target_rate']:.3f}"
            print(head + _rejected_note(rec["rejected"], num_samples, out.tries, options), file=sys.stderr)
            for t in rec["texts"]:
                print(t, file=sys.stderr)
                print("", file=sys.stderr)
        results.append(rec)
    return results


def _rejected_note(rejected: int, num_samples: int, tries: int, options: dict) -> str:
    if not rejected:
        return ""
    return (
        f" ({rejected} of {num_samples} samples dropped: shorter than --min-length "
        f"{options.get('min_length')} after {tries} draws)"
    )


def _sampling_options(args) -> dict:
    """Method-specific sampler options given on the command line (unset ones are None)."""
    return {
        "min_length": args.min_length,
        "max_tries": args.max_tries,
        "bos": args.bos,
        "length": args.length,
        "context": args.context,
        "gamma": args.gamma,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        **getattr(args, "guidance", {}),
    }


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from fmlm.api import load

    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = None
    if args.tokenizer:
        from fmlm.data import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    model = load(args.ckpt, device=args.device, ema=not args.no_ema, tokenizer=tokenizer)

    args.guidance = guidance_options(args, model)
    steps_list = args.steps or [model.config.sample.steps]
    if args.json or args.check:
        results = _report_samples(
            model,
            steps_list,
            args.num_samples,
            args.seed,
            args.float64,
            show=False,
            check=args.check,
            max_show=0 if args.json else 4,
            seq_len=args.seq_len,
            **_sampling_options(args),
        )
        if args.json:
            print(json.dumps({"checkpoint": str(model.path), "results": results}, indent=2))
        else:
            for r in results:
                line = f"steps {r['steps']:>5}: {r['seconds_per_sample'] * 1e3:8.2f} ms/sample"
                if "valid_rate" in r:
                    line += f"  valid {r['valid_rate']:.3f}  coverage {r['coverage']:.3f}"
                if "target_rate" in r:
                    line += f"  target {r['target_rate']:.3f}"
                print(line + _rejected_note(r["rejected"], r["num_samples"], r["tries"], _sampling_options(args)))
        return 0
    for steps in steps_list:
        out = model.generate(
            args.num_samples, steps, args.seed, float64=args.float64, seq_len=args.seq_len, **_sampling_options(args)
        )
        for text in out.texts:
            print(text)
            print()
        if out.rejected:
            note = _rejected_note(out.rejected, args.num_samples, out.tries, _sampling_options(args))
            print(f"fmlm sample: {steps} steps:{note}", file=sys.stderr)
    return 0


def guidance_options(args: argparse.Namespace, model: Model) -> dict:
    """``fmlm sample`` conditioning/guidance flags -> :meth:`fmlm.api.Model.sample_ids` options."""
    from fmlm.api import load

    out: dict = {}
    if (args.prefix is not None or getattr(args, "suffix", None) is not None) and args.infill is not None:
        raise FmlmError("give either --prefix/--suffix or --infill, not both")
    if args.prefix is not None:
        out["prefix"] = args.prefix
    if getattr(args, "suffix", None) is not None:
        out["suffix"] = args.suffix
    if args.infill is not None:
        out["infill"] = args.infill
    if getattr(args, "steer", False) or getattr(args, "cfg_weight", None) is not None:
        if out.keys().isdisjoint(("prefix", "suffix", "infill")):
            raise FmlmError("--steer and --cfg-weight need --prefix, --suffix or --infill")
        if args.steer and args.cfg_weight is not None:
            raise FmlmError("--cfg-weight needs the learned conditioning, not --steer")
        out["cond_mode"] = "steer" if args.steer else None
        out["cfg_weight"] = args.cfg_weight
    if args.guide_weak is not None:
        out["guide_weak"] = load(args.guide_weak, device=model.device)
        out["guide_weight"] = 1.0 if args.guide_weight is None else args.guide_weight
    elif args.guide_weight is not None:
        raise FmlmError("--guide-weight needs --guide-weak RUN")
    if args.reward is not None:
        out["classifier"] = load(args.reward, device=model.device)
        out["target"] = args.reward_target
        if args.reward_scale is not None:
            out["reward_scale"] = args.reward_scale
        if args.reward_iters is not None:
            out["reward_iters"] = args.reward_iters
        if args.reward_temperature is not None:
            out["reward_temperature"] = args.reward_temperature
    elif any(
        v is not None for v in (args.reward_target, args.reward_scale, args.reward_iters, args.reward_temperature)
    ):
        raise FmlmError("--reward-target, --reward-scale, --reward-iters and --reward-temperature need --reward RUN")
    return out
