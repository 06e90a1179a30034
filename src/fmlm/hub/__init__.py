"""Hugging Face-style model files: ``save_pretrained`` / ``from_pretrained`` directories with a model
card, ``fmlm export RUN DIR``, and upload/download through ``huggingface_hub`` (the ``hub`` extra).

:func:`fmlm.from_pretrained` and :meth:`fmlm.api.Model.save_pretrained` /
:meth:`~fmlm.api.Model.push_to_hub` are the public entry points; the files are described in
:mod:`fmlm.hub.files`.
"""

from __future__ import annotations

from pathlib import Path

from fmlm.hub.files import check_pretrained, find_eval, push, read_eval, resolve, save_pretrained, source_info


def export(
    path: str | Path,
    out: str | Path,
    ema: bool = True,
    eval_path: str | Path | None = None,
    name: str | None = None,
) -> Path:
    """Export a run or checkpoint directory (its newest valid checkpoint) as a model directory.

    The weights are loaded strictly into the method first, so an export always loads back.
    ``ema``: the EMA weights when the checkpoint has them (else the raw ones). ``eval_path``: an
    ``fmlm eval`` JSON for the card's table (default: ``eval.json`` beside the checkpoint or in
    the run directory, when there is one).
    """
    from fmlm.hub.files import weights_of
    from fmlm.methods.registry import load_method

    cfg, method, tok, p = load_method(path, "cpu", ema=ema)
    result = read_eval(eval_path) if eval_path is not None else find_eval(p)
    return save_pretrained(
        out,
        cfg.to_dict(),
        method.state_dict(),
        tok,
        weights=weights_of(p, ema),
        name=name,
        source=source_info(p),
        eval_result=result,
    )


def save_model(model, directory: str | Path, name: str | None = None, eval_result=None) -> Path:
    """:meth:`fmlm.api.Model.save_pretrained`: ``model``'s config, weights and tokenizer as a model
    directory; ``eval_result`` an ``fmlm eval`` JSON (path or dict; default: the one beside its checkpoint)."""
    if isinstance(eval_result, (str, Path)):
        eval_result = read_eval(eval_result)
    return save_pretrained(
        directory,
        model.config.to_dict(),
        model.method.state_dict(),
        model.tokenizer,
        weights=model.weights,
        name=name,
        source=source_info(model.path),
        eval_result=eval_result if eval_result is not None else find_eval(model.path),
    )


def push_model(model, repo_id: str, private: bool | None = None, token: str | None = None, **kw):
    """:meth:`fmlm.api.Model.push_to_hub`: save to a temporary directory, then :func:`push` it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fmlm-push-") as tmp:
        d = save_model(model, Path(tmp) / "model", name=repo_id)
        return push(d, repo_id, private=private, token=token, **kw)


__all__ = ["check_pretrained", "export", "push", "push_model", "resolve", "save_model", "save_pretrained"]
