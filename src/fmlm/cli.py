"""Command-line interface: ``fmlm train | distill | sample | eval | bench | serve | plot | data | config``.

Every user-fixable problem (unknown preset or key, bad value, missing or corrupt
checkpoint, empty or non-UTF-8 corpus, ...) is reported as one line on stderr
with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fmlm.errors import FmlmError


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _steps_list(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps must be integers, got {text!r}") from None
    if not steps or any(s < 1 for s in steps):
        raise argparse.ArgumentTypeError(f"steps must be >= 1, got {text!r}")
    return steps


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in 0..65535, got {v}")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _split_preset(items: list[str]) -> tuple[str | None, list[str]]:
    """The first positional is a preset or .toml file unless it is a key=value override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args) -> int:
    from fmlm.config import build_config

    preset, overrides = _split_preset(args.config)
    cfg = build_config(preset, overrides)
    if "+" in cfg.train.method:  # a two-stage job, e.g. flm+semigroup (the default preset's)
        from fmlm.mainjob import cmd_main_job

        return cmd_main_job(cfg, args)
    return _fit_and_report(cfg, args)


def _fit_and_report(cfg, args, tokenizer=None) -> int:
    """Train (or resume) in the run directory, then print the summary and a few samples."""
    from fmlm.train import Trainer

    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.preset
    log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    trainer = Trainer(cfg, run_dir, restart=args.restart, progress=not args.quiet, log=log,
                      tokenizer=tokenizer)
    summary = trainer.fit()
    if summary["rank"] != 0:  # torchrun: rank 0 reports
        return 130 if summary["interrupted"] else 0
    if not args.no_samples and not summary["interrupted"] and hasattr(trainer.method, "sample"):
        from fmlm.api import load

        model = load(run_dir, device=trainer.device)
        summary["samples"] = _report_samples(model, [cfg.sample.steps], cfg.sample.num_samples,
                                             cfg.sample.seed, cfg.sample.float64, show=not args.quiet,
                                             check=model.task is not None)
    print(json.dumps(summary, indent=2))
    return 130 if summary["interrupted"] else 0


def cmd_distill(args) -> int:
    """Stage 2: distil an FLM teacher into a flow map (or self-distil from scratch)."""
    from fmlm.distillation import distill_config

    preset, overrides = _split_preset(args.config)
    cfg, tokenizer = distill_config(args.teacher, args.self_distill, preset, overrides)
    return _fit_and_report(cfg, args, tokenizer=tokenizer)


def _report_samples(model, steps_list, num_samples, seed, float64, show=True, check=False, max_show=4,
                    seq_len=None, **options) -> list[dict]:
    results = []
    for steps in steps_list:
        t0 = time.perf_counter()
        ids = model.sample_ids(num_samples, steps, seed, float64=float64, seq_len=seq_len, **options)
        dt = time.perf_counter() - t0
        texts = model.decode(ids)
        rec = {"steps": steps, "num_samples": num_samples, "seed": seed,
               "seconds_per_sample": dt / num_samples}
        if check and model.task is not None:
            m = model.task.check(ids)
            rec.update(valid_rate=m["valid_rate"], coverage=m["coverage"])
        if check and options.get("classifier") is not None:  # reward guidance: share of the target class
            clf = options["classifier"]
            rec["target_rate"] = (clf.labels(ids) == clf.class_index(options.get("target"))).float().mean().item()
        rec["texts"] = texts[:max_show] if max_show else texts
        if show:
            head = f"--- {steps} steps, {rec['seconds_per_sample'] * 1e3:.2f} ms/sample"
            if "valid_rate" in rec:
                head += f", valid {rec['valid_rate']:.3f}, coverage {rec['coverage']:.3f}"
            if "target_rate" in rec:
                head += f", target {rec['target_rate']:.3f}"
            print(head, file=sys.stderr)
            for t in rec["texts"]:
                print(t, file=sys.stderr)
                print("", file=sys.stderr)
        results.append(rec)
    return results


def _sampling_options(args) -> dict:
    """Method-specific sampler options given on the command line (unset ones are None)."""
    return {"gamma": args.gamma, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            **getattr(args, "guidance", {})}


def cmd_sample(args) -> int:
    import torch

    from fmlm.api import load

    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = None
    if args.tokenizer:
        from fmlm.data import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    model = load(args.ckpt, device=args.device, ema=not args.no_ema, tokenizer=tokenizer)
    from fmlm.guidance import cli_options

    args.guidance = cli_options(args, model)
    steps_list = args.steps or [model.config.sample.steps]
    if args.json or args.check:
        results = _report_samples(model, steps_list, args.num_samples, args.seed, args.float64, show=False,
                                  check=args.check, max_show=0 if args.json else 4, seq_len=args.seq_len,
                                  **_sampling_options(args))
        if args.json:
            print(json.dumps({"checkpoint": str(model.path), "results": results}, indent=2))
        else:
            for r in results:
                line = f"steps {r['steps']:>5}: {r['seconds_per_sample'] * 1e3:8.2f} ms/sample"
                if "valid_rate" in r:
                    line += f"  valid {r['valid_rate']:.3f}  coverage {r['coverage']:.3f}"
                if "target_rate" in r:
                    line += f"  target {r['target_rate']:.3f}"
                print(line)
        return 0
    for steps in steps_list:
        for text in model.sample(args.num_samples, steps, args.seed, float64=args.float64, seq_len=args.seq_len,
                                 **_sampling_options(args)):
            print(text)
            print()
    return 0


def cmd_eval(args) -> int:
    from fmlm.bench.evaluate import run

    return run(args)


def cmd_bench(args) -> int:
    """``fmlm bench PRESET ...`` (the side-by-side suite), ``bench train ...`` (throughput), ``bench report DIR``."""
    from fmlm.bench import dispatch

    return dispatch(args.target, args.rest)


def cmd_data(args) -> int:
    from fmlm.config import build_config
    from fmlm.train import load_data

    preset, overrides = _split_preset(args.config)
    cfg = build_config(preset, overrides)
    bundle = load_data(cfg)
    info = dict(bundle.info)
    info.update(vocab_size=bundle.tokenizer.vocab_size, tokenizer=bundle.tokenizer.spec,
                seq_len=cfg.data.seq_len, train_blocks=len(bundle.train), val_blocks=len(bundle.val))
    print(json.dumps(info, indent=2, default=str))
    for i in range(min(args.show, len(bundle.train))):
        print(f"--- train block {i}", file=sys.stderr)
        print(bundle.tokenizer.decode(bundle.train.batch([i])[0].tolist()), file=sys.stderr)
    return 0


def cmd_config(args) -> int:
    from fmlm.config import PRESETS, build_config

    if args.list:
        for name in PRESETS:
            print(name)
        return 0
    preset, overrides = _split_preset(args.config)
    print(json.dumps(build_config(preset, overrides).to_dict(), indent=2))
    return 0


def cmd_serve(args) -> int:
    from fmlm.serve import ServeLimits, serve

    limits = ServeLimits(max_steps=args.max_steps, max_samples=args.max_samples, max_queue=args.max_queue)
    serve(args.ckpt, host=args.host, port=args.port, threads=args.threads, limits=limits, device=args.device,
          docs=args.docs)
    return 0


def cmd_plot(args) -> int:
    from fmlm.plot import run

    result = run(args.what, Path(args.out), args.vocab, seed=args.seed, flm_steps=args.flm_steps,
                 fmlm_steps=args.fmlm_steps, progress=not args.quiet)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fmlm", description="Flow-based and flow map language models.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (default: the embedded Shakespeare preset)",
                       description="Train a model. CONFIG is a preset name or a .toml file, followed by "
                                   "key=value overrides (e.g. lr=1e-3 train.max_steps=500 loss=mse_denoiser "
                                   "time=uniform). Re-running the same command resumes from the last "
                                   "checkpoint in the run directory. A two-stage method (flm+semigroup, the "
                                   "default preset's; flm+lagrangian, flm+eulerian) trains the FLM in RUN_DIR, "
                                   "distils its flow map into RUN_DIR-<objective> and prints both side by side; "
                                   "method=flm trains the FLM alone.")
    t.add_argument("config", nargs="*", metavar="PRESET|FILE.toml|key=value")
    t.add_argument("--run-dir", help="run directory (default: runs/<preset>)")
    t.add_argument("--restart", "--no-resume", dest="restart", action="store_true",
                   help="start over on purpose: the old log and checkpoints move to RUN_DIR/archive/ (a re-run "
                        "otherwise resumes, and refuses to start over when every checkpoint is corrupt)")
    t.add_argument("--no-samples", action="store_true", help="do not sample at the end")
    t.add_argument("--quiet", action="store_true", help="no progress bar or log lines; print only the summary")
    t.set_defaults(func=cmd_train)

    ds = sub.add_parser("distill", help="distil an FLM into a flow map LM (one-step generation)",
                        description="Stage 2: distil an FLM teacher into a flow map language model. "
                                    "key=value overrides follow, e.g. method=semigroup|lagrangian|eulerian, "
                                    "max_steps=2000, distill.diag_fraction=0.5. With --self, train a flow map "
                                    "from scratch on a preset's data, without a teacher. A Duo teacher distils "
                                    "with method=dcd (Duo + DCD), an MDLM teacher with method=sdtt (MDLM + SDTT): "
                                    "distill.rounds, distill.base_steps, distill.teacher_steps, distill.divergence.")
    ds.add_argument("config", nargs="*", metavar="[PRESET] key=value")
    ds.add_argument("--teacher", help="FLM (or Duo / MDLM) run or checkpoint directory")
    ds.add_argument("--self", dest="self_distill", action="store_true",
                    help="self-distillation: no teacher; PRESET gives the data and backbone")
    ds.add_argument("--run-dir", help="run directory (default: runs/<preset>-<method>)")
    ds.add_argument("--restart", "--no-resume", dest="restart", action="store_true",
                    help="start over on purpose (the old log and checkpoints are archived)")
    ds.add_argument("--no-samples", action="store_true")
    ds.add_argument("--quiet", action="store_true")
    ds.set_defaults(func=cmd_distill)

    s = sub.add_parser("sample", help="sample text from a checkpoint",
                       description="Sample from a checkpoint or run directory (its newest checkpoint).")
    s.add_argument("--ckpt", required=True, help="checkpoint or run directory")
    s.add_argument("--steps", type=_steps_list, help="number of steps, or a comma-separated list (e.g. 1,2,4,8)")
    s.add_argument("--num-samples", "-n", type=_positive, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seq-len", type=_positive, help="sequence length (at most the model's maximum)")
    s.add_argument("--float64", action="store_true", help="integrate the flow in float64")
    s.add_argument("--gamma", type=float, help="flow-map models: stochastic re-noising in [0, 1)")
    s.add_argument("--temperature", type=float, help="AR: sampling temperature (default 1)")
    s.add_argument("--top-k", type=int, help="AR: keep the k most likely tokens (default: all)")
    s.add_argument("--top-p", type=float, help="AR: nucleus mass (default 1)")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--tokenizer", help="replacement tokenizer directory (must match the model's vocabulary)")
    s.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    s.add_argument("--threads", type=_positive, help="CPU threads (default: PyTorch's choice)")
    s.add_argument("--check", action="store_true",
                   help="synthetic tasks: print valid rate and coverage (and the target rate with --reward)")
    g = s.add_argument_group("conditioning and guidance (FLM, FMLM; prefix/infill also MDLM, Duo, AR)")
    g.add_argument("--prefix", help="text the samples start with (tokenised with the model's tokenizer)")
    g.add_argument("--suffix", help="text the samples end with (alone or with --prefix; not AR)")
    g.add_argument("--infill", help='template with gaps, e.g. "The [MASK:5] of York" ([MASK] = one token)')
    g.add_argument("--guide-weak", metavar="RUN", help="autoguidance: a weaker model of the same data")
    g.add_argument("--guide-weight", type=float, metavar="W", help="autoguidance weight w (default 1)")
    g.add_argument("--reward", metavar="RUN", help="reward guidance: a classifier run (fmlm train method=classifier)")
    g.add_argument("--reward-target", metavar="CLASS", help="target class: index or name")
    g.add_argument("--reward-scale", type=float, help="reward step size, in noise std units (default 0.1)")
    g.add_argument("--reward-iters", type=int, help="reward gradient steps per sampler step (default 10)")
    g.add_argument("--reward-temperature", type=float,
                   help="softening T of the look-ahead the reward scores (default 8)")
    s.add_argument("--json", action="store_true", help="print JSON (texts, timings, metrics)")
    s.set_defaults(func=cmd_sample)

    sv = sub.add_parser("serve", help="HTTP API and a live web page of the denoising",
                        description="Serve one or more checkpoints: JSON and streaming (SSE) generation, "
                                    "/health, and a web page at / that shows the tokens resolving, e.g. "
                                    "--ckpt flm=runs/shakespeare --ckpt fmlm=runs/shakespeare-semigroup.")
    sv.add_argument("--ckpt", action="append", required=True, metavar="[NAME=]PATH",
                    help="checkpoint or run directory; repeat to serve several models side by side")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free port)")
    sv.add_argument("--docs", action="store_true", help="also serve the OpenAPI schema and /docs (off by default)")
    sv.add_argument("--threads", type=_positive, default=1, help="CPU threads of the model worker")
    sv.add_argument("--device", help="cpu, cuda, mps (default: cpu)")
    sv.add_argument("--max-steps", type=_positive, default=1024, help="largest steps a request may ask for")
    sv.add_argument("--max-samples", type=_positive, default=16, help="largest num_samples of one request")
    sv.add_argument("--max-queue", type=_positive, default=8, help="requests that may wait; more get 503")
    sv.set_defaults(func=cmd_serve)

    pl = sub.add_parser("plot", help="explanatory plots: the time schedule, a V=3 toy on the simplex",
                        description="schedule: P_e(t) and tau(t) for --vocab sizes. simplex: trains a tiny FLM "
                                    "and a flow map on the V=3 task simplex3 (seconds) and draws the learned "
                                    "denoiser / velocity field, sample paths and flow vs flow map on the "
                                    "2-simplex. PNG and SVG in --out.")
    pl.add_argument("what", choices=("schedule", "simplex", "all"), nargs="?", default="all")
    pl.add_argument("--out", default="plots", help="output folder (default: plots)")
    pl.add_argument("--vocab", type=_steps_list, default=[3, 65, 30522, 50257],
                    help="vocabulary sizes for the schedule plot (comma-separated)")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--flm-steps", type=_positive, default=1000, help="training steps of the toy FLM")
    pl.add_argument("--fmlm-steps", type=_positive, default=1500, help="distillation steps of the toy flow map")
    pl.add_argument("--quiet", action="store_true", help="no progress bars")
    pl.set_defaults(func=cmd_plot)

    e = sub.add_parser("eval", help="evaluate a checkpoint: bits/byte, gen-PPL, entropy, speed, likelihood",
                       description="Sample with each step count; report bits per byte and generative perplexity "
                                   "under a scorer LM, with held-out and shuffled text as references "
                                   "(or valid rate and coverage on the phrases task), unigram entropy, time per "
                                   "sample and the method's validation likelihood, as JSON.")
    from fmlm.bench.evaluate import add_arguments as _eval_arguments

    _eval_arguments(e)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="side-by-side benchmark of all methods (or `bench train`: throughput)",
                       description="fmlm bench PRESET [options]: train or reuse FLM, FMLM, MDLM, Duo and AR on "
                                   "the same data and sweep the number of steps; `fmlm bench PRESET --help` "
                                   "lists the options. fmlm bench train: training throughput. fmlm bench speed: "
                                   "sampling speed and FLOP utilisation. fmlm bench report DIR: rewrite a finished "
                                   "bench's table, headline and plots from its results.json. "
                                   "fmlm bench rescore DIR --scorer NAME: score its saved samples under another "
                                   "scorer. fmlm bench scaling [PRESET] --budgets ...: the comparison at several "
                                   "training budgets and widths.",
                       add_help=True)
    b.add_argument("target", metavar="PRESET|train|speed|report|rescore|scaling",
                   help="bench preset (phrases, shakespeare-cpu, lm1b-cpu, lm1b, owt, tiny), `train`, `speed`, "
                        "`report`, `rescore` or `scaling`")
    b.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("data", help="prepare and inspect a dataset (tokenise, pack, cache)",
                       description="Tokenise, pack and cache the data of a preset; print statistics.")
    d.add_argument("config", nargs="*", metavar="PRESET|FILE.toml|key=value")
    d.add_argument("--show", type=int, default=1, help="print this many decoded training blocks")
    d.set_defaults(func=cmd_data)

    c = sub.add_parser("config", help="print the resolved config of a preset with overrides")
    c.add_argument("config", nargs="*", metavar="PRESET|FILE.toml|key=value")
    c.add_argument("--list", action="store_true", help="list the presets")
    c.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (``fmlm train tiny --quiet lr=1e-3``): argparse leaves
    # those as unknown arguments, so collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "config") and all("=" in e and not e.startswith("-") for e in extra):
            args.config = list(args.config) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        from fmlm import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        import torch

        # Near-one-hot states late in the flow give denormal floats in softmax/exp, which
        # are very slow on CPUs; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)
        return args.func(args)
    except FmlmError as e:
        sys.stderr.write(f"fmlm: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("fmlm: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
