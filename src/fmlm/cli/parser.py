"""The argument parser of ``fmlm``: every subcommand, its options and the function it runs."""

from __future__ import annotations

import argparse

from fmlm.argtypes import Parser, milliseconds, port, positive, steps_list
from fmlm.cli.commands import cmd_bench, cmd_config, cmd_data, cmd_eval, cmd_plot, cmd_serve
from fmlm.cli.hub import add_parsers as add_hub_parsers
from fmlm.cli.sample import cmd_sample
from fmlm.cli.train import cmd_distill, cmd_train


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fmlm", description="Flow-based and flow map language models.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=Parser)

    t = sub.add_parser(
        "train",
        help="train a model (default: the embedded Shakespeare preset)",
        description="Train a model. CONFIG is a preset name or a .toml file, followed by "
        "key=value overrides (e.g. lr=1e-3 train.max_steps=500 loss=mse_denoiser "
        "time=uniform). Re-running the same command resumes from the last "
        "checkpoint in the run directory. A two-stage method (flm+semigroup, the "
        "default preset's; flm+lagrangian, flm+eulerian) trains the FLM in RUN_DIR, "
        "distils its flow map into RUN_DIR-<objective> and prints both side by side; "
        "method=flm trains the FLM alone.",
    )
    t.add_argument("config", nargs="*", metavar="PRESET|FILE.toml|key=value")
    t.add_argument("--run-dir", help="run directory (default: runs/<preset>)")
    t.add_argument(
        "--restart",
        "--no-resume",
        dest="restart",
        action="store_true",
        help="start over on purpose: the old log and checkpoints move to RUN_DIR/archive/ (a re-run "
        "otherwise resumes, and refuses to start over when every checkpoint is corrupt)",
    )
    t.add_argument("--no-samples", action="store_true", help="do not sample at the end")
    t.add_argument("--quiet", action="store_true", help="no progress bar or log lines; print only the summary")
    t.set_defaults(func=cmd_train)

    ds = sub.add_parser(
        "distill",
        help="distil an FLM into a flow map LM (one-step generation)",
        description="Stage 2: distil an FLM teacher into a flow map language model. "
        "key=value overrides follow, e.g. method=semigroup|lagrangian|eulerian, "
        "max_steps=2000, distill.diag_fraction=0.5. With --self, train a flow map "
        "from scratch on a preset's data, without a teacher. A Duo teacher distils "
        "with method=dcd (Duo + DCD), an MDLM teacher with method=sdtt (MDLM + SDTT): "
        "distill.rounds, distill.base_steps, distill.teacher_steps, distill.divergence.",
    )
    ds.add_argument("config", nargs="*", metavar="[PRESET] key=value")
    ds.add_argument("--teacher", help="FLM (or Duo / MDLM) run or checkpoint directory")
    ds.add_argument(
        "--self",
        dest="self_distill",
        action="store_true",
        help="self-distillation: no teacher; PRESET gives the data and backbone",
    )
    ds.add_argument("--run-dir", help="run directory (default: runs/<preset>-<method>)")
    ds.add_argument(
        "--restart",
        "--no-resume",
        dest="restart",
        action="store_true",
        help="start over on purpose (the old log and checkpoints are archived)",
    )
    ds.add_argument("--no-samples", action="store_true")
    ds.add_argument("--quiet", action="store_true")
    ds.set_defaults(func=cmd_distill)

    s = sub.add_parser(
        "sample",
        help="sample text from a checkpoint",
        description="Sample from a checkpoint or run directory (its newest checkpoint).",
    )
    s.add_argument("--ckpt", required=True, help="checkpoint or run directory")
    s.add_argument("--steps", type=steps_list, help="number of steps, or a comma-separated list (e.g. 1,2,4,8)")
    s.add_argument("--num-samples", "-n", type=positive, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seq-len", type=positive, help="sequence length (at most the model's maximum)")
    s.add_argument(
        "--length",
        type=positive,
        metavar="N",
        help="texts of N tokens, beyond the block too: written block by block (see --context)",
    )
    s.add_argument(
        "--context",
        type=int,
        metavar="K",
        help="with --length: each next block continues the last K tokens (default half the block)",
    )
    s.add_argument("--float64", action="store_true", help="integrate the flow in float64")
    s.add_argument(
        "--min-length",
        type=int,
        default=0,
        metavar="N",
        help="redraw samples with fewer than N tokens before their EOS (see --max-tries)",
    )
    s.add_argument(
        "--max-tries", type=int, default=8, metavar="K", help="draws per sample before a short one is dropped"
    )
    s.add_argument(
        "--bos", action="store_true", help="wrap-packed text: start at a document start (EOS as the first token)"
    )
    s.add_argument("--gamma", type=float, help="flow-map models: stochastic re-noising in [0, 1)")
    s.add_argument("--temperature", type=float, help="AR: sampling temperature (default 1)")
    s.add_argument("--top-k", type=int, help="AR: keep the k most likely tokens (default: all)")
    s.add_argument("--top-p", type=float, help="AR: nucleus mass (default 1)")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--tokenizer", help="replacement tokenizer directory (must match the model's vocabulary)")
    s.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    s.add_argument("--threads", type=positive, help="CPU threads (default: PyTorch's choice)")
    s.add_argument(
        "--check",
        action="store_true",
        help="synthetic tasks: print valid rate and coverage (and the target rate with --reward)",
    )
    g = s.add_argument_group("conditioning and guidance (FLM, FMLM; prefix/infill also MDLM, Duo, AR)")
    g.add_argument("--prefix", help="text the samples start with (tokenised with the model's tokenizer)")
    g.add_argument("--suffix", help="text the samples end with (alone or with --prefix; not AR)")
    g.add_argument("--infill", help='template with gaps, e.g. "The [MASK:5] of York" ([MASK] = one token)')
    g.add_argument(
        "--steer",
        action="store_true",
        help="prefix/infill by sampling-time steering even on a model trained with train.cond_prob > 0 "
        "(default there: its learned conditioning)",
    )
    g.add_argument(
        "--cfg-weight", type=float, metavar="W", help="classifier-free guidance weight (learned conditioning; 0: none)"
    )
    g.add_argument("--guide-weak", metavar="RUN", help="autoguidance: a weaker model of the same data")
    g.add_argument("--guide-weight", type=float, metavar="W", help="autoguidance weight w (default 1)")
    g.add_argument("--reward", metavar="RUN", help="reward guidance: a classifier run (fmlm train method=classifier)")
    g.add_argument("--reward-target", metavar="CLASS", help="target class: index or name")
    g.add_argument("--reward-scale", type=float, help="reward step size, in noise std units (default 0.1)")
    g.add_argument("--reward-iters", type=int, help="reward gradient steps per sampler step (default 10)")
    g.add_argument(
        "--reward-temperature", type=float, help="softening T of the look-ahead the reward scores (default 8)"
    )
    s.add_argument("--json", action="store_true", help="print JSON (texts, timings, metrics)")
    s.set_defaults(func=cmd_sample)

    sv = sub.add_parser(
        "serve",
        help="HTTP API and a live web page of the denoising",
        description="Serve one or more checkpoints: JSON and streaming (SSE) generation, "
        "OpenAI-compatible /v1/completions and /v1/models (batched), /health, and a web page at / "
        "that shows the tokens resolving, e.g. "
        "--ckpt flm=runs/shakespeare --ckpt fmlm=runs/shakespeare-semigroup.",
    )
    sv.add_argument(
        "--ckpt",
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help="checkpoint or run directory; repeat to serve several models side by side",
    )
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=port, default=8000, help="TCP port (0: any free port)")
    sv.add_argument("--docs", action="store_true", help="also serve the OpenAPI schema and /docs (off by default)")
    sv.add_argument("--threads", type=positive, default=1, help="CPU threads of the model worker")
    sv.add_argument("--device", help="cpu, cuda, mps (default: cpu)")
    sv.add_argument("--max-steps", type=positive, default=1024, help="largest steps a request may ask for")
    sv.add_argument("--max-samples", type=positive, default=16, help="largest num_samples of one request")
    sv.add_argument("--max-queue", type=positive, default=8, help="requests that may wait; more get 503")
    sv.add_argument(
        "--batch-max",
        type=positive,
        default=32,
        help="most sequences in one batched forward pass; requests with the same model and settings share one (1: off)",
    )
    sv.add_argument(
        "--batch-window",
        type=milliseconds,
        default=0.0,
        metavar="MS",
        help="how long a batch waits for more requests after its first (default 0: only those already waiting)",
    )
    sv.set_defaults(func=cmd_serve)

    pl = sub.add_parser(
        "plot",
        help="explanatory plots: the time schedule, a V=3 toy on the simplex",
        description="schedule: P_e(t) and tau(t) for --vocab sizes. simplex: trains a tiny FLM "
        "and a flow map on the V=3 task simplex3 (seconds) and draws the learned "
        "denoiser / velocity field, sample paths and flow vs flow map on the "
        "2-simplex. PNG and SVG in --out.",
    )
    pl.add_argument("what", choices=("schedule", "simplex", "all"), nargs="?", default="all")
    pl.add_argument("--out", default="plots", help="output folder (default: plots)")
    pl.add_argument(
        "--vocab",
        type=steps_list,
        default=[3, 65, 30522, 50257],
        help="vocabulary sizes for the schedule plot (comma-separated)",
    )
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--flm-steps", type=positive, default=1000, help="training steps of the toy FLM")
    pl.add_argument("--fmlm-steps", type=positive, default=1500, help="distillation steps of the toy flow map")
    pl.add_argument("--quiet", action="store_true", help="no progress bars")
    pl.set_defaults(func=cmd_plot)

    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: bits/byte, gen-PPL, entropy, speed, likelihood",
        description="Sample with each step count; report bits per byte and generative perplexity "
        "under a scorer LM, with held-out and shuffled text as references "
        "(or valid rate and coverage on the phrases task), unigram entropy, time per "
        "sample and the method's validation likelihood, as JSON.",
    )
    from fmlm.bench.evaluate import add_arguments as _eval_arguments

    _eval_arguments(e)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "bench",
        help="side-by-side benchmark of all methods (or `bench train`: throughput)",
        description="fmlm bench PRESET [options]: train or reuse FLM, FMLM, MDLM, Duo and AR on "
        "the same data and sweep the number of steps; `fmlm bench PRESET --help` "
        "lists the options. fmlm bench train: training throughput. fmlm bench speed: "
        "sampling speed and FLOP utilisation. fmlm bench report DIR: rewrite a finished "
        "bench's table, headline and plots from its results.json. "
        "fmlm bench rescore DIR --scorer NAME: score its saved samples under another "
        "scorer. fmlm bench scaling [PRESET] --budgets ...: the comparison at several "
        "training budgets and widths.",
        add_help=True,
    )
    b.add_argument(
        "target",
        metavar="PRESET|train|speed|report|rescore|scaling",
        help="bench preset (phrases, shakespeare-cpu, lm1b-cpu, lm1b, owt, tiny), `train`, `speed`, "
        "`report`, `rescore` or `scaling`",
    )
    b.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser(
        "data",
        help="prepare and inspect a dataset (tokenise, pack, cache)",
        description="Tokenise, pack and cache the data of a preset; print statistics.",
    )
    d.add_argument("config", nargs="*", metavar="PRESET|FILE.toml|key=value")
    d.add_argument("--show", type=int, default=1, help="print this many decoded training blocks")
    d.set_defaults(func=cmd_data)

    c = sub.add_parser("config", help="print the resolved config of a preset with overrides")
    c.add_argument("config", nargs="*", metavar="PRESET|FILE.toml|key=value")
    c.add_argument("--list", action="store_true", help="list the presets")
    c.set_defaults(func=cmd_config)
    add_hub_parsers(sub)  # export, import
    return p
