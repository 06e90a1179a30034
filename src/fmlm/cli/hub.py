"""``fmlm export`` (a run or checkpoint as a Hugging Face-style model directory) and ``fmlm import``
(the authors' checkpoints as one), each one library call."""

from __future__ import annotations

import argparse
import sys


def cmd_export(args: argparse.Namespace) -> int:
    from fmlm.hub import export

    out = export(args.run, args.out, ema=not args.raw, eval_path=args.eval, name=args.name)
    print(out)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from fmlm.hub.official import import_flm_official

    out = import_flm_official(
        args.ckpt,
        args.out,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        n_heads=args.n_heads,
        dataset=args.dataset,
        weights=args.weights,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    print(out)
    return 0


def add_parsers(sub) -> None:
    x = sub.add_parser(
        "export",
        help="write a run or checkpoint as a Hugging Face-style model directory (with a model card)",
        description="Export RUN (a run directory: its newest valid checkpoint; or a checkpoint directory) "
        "to DIR: config.json, model.safetensors (the EMA weights unless --raw), the tokenizer and a "
        "model card README.md. fmlm.from_pretrained(DIR) loads it; DIR is also an fmlm checkpoint.",
    )
    x.add_argument("run", metavar="RUN", help="run or checkpoint directory")
    x.add_argument("out", metavar="DIR", help="the model directory to write")
    x.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA ones")
    x.add_argument("--eval", help="an `fmlm eval --out` JSON for the card's table (default: RUN's eval.json, if any)")
    x.add_argument("--name", help="the model's name in the card (default: DIR's name)")
    x.set_defaults(func=cmd_export)

    i = sub.add_parser(
        "import",
        help="convert the authors' FLM checkpoint (david3684/flm) into an fmlm model directory",
        description="Convert a stage-1 FLM checkpoint of the authors' code (a Lightning .ckpt, read with "
        "torch.load(weights_only=True), or a .safetensors file of its state dict) into an fmlm model "
        "directory that fmlm eval, sample and from_pretrained take.",
    )
    i.add_argument("kind", choices=["flm-official"], help="the checkpoint's kind")
    i.add_argument("ckpt", metavar="CKPT", help=".ckpt or .safetensors file")
    i.add_argument("--out", required=True, help="the model directory to write")
    i.add_argument(
        "--tokenizer",
        required=True,
        help="the tokenizer it was trained with: a saved fmlm tokenizer folder, a tokenizer.json, or a spec fmlm "
        "knows (gpt2 for OpenWebText, bert-base-uncased for LM1B; gpt2:DIR, bert-base-uncased:DIR: local files)",
    )
    i.add_argument("--seq-len", type=int, required=True, help="its block length (model.length: 1024 OWT, 128 LM1B)")
    i.add_argument("--n-heads", type=int, help="attention heads (default: from the rotary table in the checkpoint)")
    i.add_argument("--dataset", default="openwebtext", help="fmlm's name of its data (for fmlm eval's references)")
    i.add_argument(
        "--weights", choices=["ema", "raw"], default="ema", help="the EMA weights (default; what their eval uses)"
    )
    i.set_defaults(func=cmd_import)
