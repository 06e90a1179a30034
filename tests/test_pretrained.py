"""Hugging Face-style model files (fmlm.hub): save_pretrained -> from_pretrained gives the same samples bit
for bit, ``fmlm export`` of a run, the model card, strict one-line errors, and push/pull through
huggingface_hub against a local fake of the Hub (the real Hub is not reachable from the test machine)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import fmlm
from fmlm import checkpoint as ckpt
from fmlm import hub
from fmlm.api import Model
from fmlm.cli import main
from fmlm.config import build_config
from fmlm.data import PhrasesTask
from fmlm.errors import CheckpointError, FmlmError
from fmlm.hub import card
from fmlm.methods import build_method

L = 8


def tiny(method: str, seed: int = 0, path: Path | None = None, **model) -> Model:
    """A tiny model over the phrases vocabulary, its weights perturbed so that no zero-initialised
    layer hides a difference."""
    cfg = build_config("tiny", [f"train.method={method}", "threads=1"])
    task = PhrasesTask(n=4, k=2, phrases_per_seq=L // 2, seed=0)
    cfg.model.vocab_size = task.tokenizer.vocab_size
    cfg.data.seq_len = cfg.model.max_seq_len = L
    for k, v in model.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(seed)
    method_ = build_method(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in method_.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return Model(cfg, method_, task.tokenizer, path or Path("memory") / method)


@pytest.mark.parametrize("method", ["flm", "semigroup", "mdlm", "ar"])
def test_round_trip_gives_bit_identical_samples(tmp_path, method):
    model = tiny(method)
    out = model.save_pretrained(tmp_path / "m")
    back = fmlm.from_pretrained(out, device="cpu")
    steps = 3
    assert torch.equal(model.sample_ids(8, steps, seed=2), back.sample_ids(8, steps, seed=2))
    assert model.sample(4, steps, seed=5) == back.sample(4, steps, seed=5)
    assert back.config.to_dict() == model.config.to_dict() and back.weights == "ema"
    for k, v in model.method.state_dict().items():
        assert torch.equal(v, back.method.state_dict()[k]), k
    # The check can fail: another model's samples differ.
    other = tiny(method, seed=7)
    assert not torch.equal(other.sample_ids(8, steps, seed=2), back.sample_ids(8, steps, seed=2))


def test_model_card_front_matter_and_body(tmp_path):
    model = tiny("flm")
    model.config.data.dataset = "lm1b"
    result = {"results": [{"steps": 1, "gen_ppl": 812.5, "gen_bpb": 2.25, "entropy": 4.5, "seconds_per_sample": 0.002}]}
    d = model.save_pretrained(tmp_path / "flm-lm1b", name="someone/flm-lm1b", eval_result=result)
    text = (d / "README.md").read_text()
    meta = card.front_matter(text)
    assert meta["library_name"] == "fmlm" and meta["pipeline_tag"] == "text-generation"
    assert meta["datasets"] == ["lm1b"] and {"fmlm", "flow-language-model", "text-generation"} <= set(meta["tags"])
    assert "# someone/flm-lm1b" in text and 'fmlm.from_pretrained("someone/flm-lm1b")' in text
    assert "flow-based language model" in text and "the EMA weights" in text and "commit" in text
    assert "| steps | gen-PPL | gen bits/byte | entropy | ms/sample |" in text and "| 1 | 812.50 | 2.250 |" in text
    cfg_block = text.split("```json\n")[1].split("```")[0]
    assert json.loads(cfg_block) == model.config.to_dict() == json.loads((d / "config.json").read_text())
    assert json.loads((d / "eval.json").read_text()) == result
    # No eval result: no table.
    plain = model.save_pretrained(tmp_path / "plain")
    assert "## Evaluation" not in (plain / "README.md").read_text() and not (plain / "eval.json").exists()


def test_front_matter_reader():
    meta = {"library_name": "fmlm", "tags": ["a", "b: c", "-x"], "pipeline_tag": "text-generation"}
    assert card.front_matter(card.render_front_matter(meta) + "\n# body\n") == meta
    assert card.front_matter("# no front matter\n") is None
    assert card.front_matter("---\nlibrary_name: fmlm\n") is None  # never closed


def _run_with_checkpoint(tmp_path: Path, model: Model) -> tuple[Path, dict, dict]:
    """A run directory whose checkpoint holds raw weights and different EMA weights, at step 42."""
    raw = model.method.state_dict()
    ema = {k: v + 0.5 for k, v in raw.items()}
    run = tmp_path / "run"
    ckpt.save_checkpoint(
        run / "checkpoints" / "step_00000042",
        model.config.to_dict(),
        raw,
        model.tokenizer,
        ema_state=ema,
        trainer_state={"step": 42},
    )
    return run, raw, ema


def test_export_a_run_uses_the_ema_weights_and_its_eval(tmp_path, capsys):
    model = tiny("flm")
    run, raw, ema = _run_with_checkpoint(tmp_path, model)
    result = {"results": [{"steps": 4, "entropy": 3.25, "seconds_per_sample": 0.001}], "seed": 0}
    (run / "eval.json").write_text(json.dumps(result))
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    back = fmlm.from_pretrained(tmp_path / "out", device="cpu")
    assert all(torch.equal(back.method.state_dict()[k], v) for k, v in ema.items())
    text = (tmp_path / "out" / "README.md").read_text()
    assert "step 42" in text and "| 4 | 3.250 | 1.00 |" in text and back.weights == "ema"
    # --raw: the raw weights, and the card says so; a re-export of a loaded export keeps "raw".
    assert main(["export", str(run), str(tmp_path / "raw"), "--raw"]) == 0
    back = fmlm.from_pretrained(tmp_path / "raw", device="cpu")
    assert all(torch.equal(back.method.state_dict()[k], v) for k, v in raw.items()) and back.weights == "raw"
    assert "raw (non-EMA) weights" in back.save_pretrained(tmp_path / "again").joinpath("README.md").read_text()
    # The exported directory is an fmlm checkpoint too: `fmlm sample` takes it.
    assert main(["sample", "--ckpt", str(tmp_path / "out"), "--steps", "2", "-n", "2"]) == 0


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_strict_loading_errors(tmp_path, capsys):
    model = tiny("flm")
    good = model.save_pretrained(tmp_path / "good")

    def broken(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    d = broken("nocard")
    (d / "README.md").unlink()
    with pytest.raises(CheckpointError, match="no README.md model card"):
        fmlm.from_pretrained(d)
    d = broken("otherlib")
    (d / "README.md").write_text((d / "README.md").read_text().replace("library_name: fmlm", "library_name: peft"))
    with pytest.raises(CheckpointError, match="library_name 'peft', expected library_name: fmlm"):
        fmlm.from_pretrained(d)
    d = broken("noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model file missing: .*model.safetensors"):
        fmlm.from_pretrained(d)
    d = broken("tampered")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        fmlm.from_pretrained(d)
    # Weights that do not fit the config (a wider model's), or an extra key: named, one line.
    wide = tiny("flm", d_model=96)
    bad = hub.save_pretrained(tmp_path / "shape", model.config.to_dict(), wide.method.state_dict(), model.tokenizer)
    with pytest.raises(
        CheckpointError, match=r"does not match the model: net\.\S+ has shape \(192,\), model expects \(128,\)"
    ):
        fmlm.from_pretrained(bad)
    extra = {**model.method.state_dict(), "net.extra": torch.zeros(2)}
    bad = hub.save_pretrained(tmp_path / "extra", model.config.to_dict(), extra, model.tokenizer)
    with pytest.raises(CheckpointError, match=r"unexpected 1 keys \(e.g. net.extra\)"):
        fmlm.from_pretrained(bad)
    with pytest.raises(CheckpointError, match="neither a local directory nor a Hub id"):
        fmlm.from_pretrained(str(tmp_path / "missing" / "a" / "b"))
    with pytest.raises(FmlmError, match="revision applies to Hub ids"):
        fmlm.from_pretrained(good, revision="main")
    # The CLI: one line, exit 2.
    assert "not a checkpoint or run directory" in _one_line_error(capsys, ["export", str(tmp_path), "x"])
    assert "a non-empty directory that is not an fmlm model" in _one_line_error(
        capsys, ["export", str(good), str(tmp_path)]
    )


class FakeHub:
    """A local stand-in for the Hub: ``HfApi.create_repo``/``upload_folder`` copy into ``root/REPO/REVISION``,
    ``snapshot_download`` copies a revision into a cache folder (as the real one does) and returns it."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []
        fake = self

        class HfApi:
            def __init__(self, token=None):
                fake.calls.append(("HfApi", token))

            def create_repo(self, repo_id, repo_type, private, exist_ok):
                fake.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))
                (fake.root / repo_id).mkdir(parents=True, exist_ok=True)

            def create_branch(self, repo_id, repo_type, branch, exist_ok):
                fake.calls.append(("create_branch", repo_id, branch, exist_ok))
                (fake.root / repo_id / branch).mkdir(parents=True, exist_ok=True)

            def upload_folder(self, repo_id, repo_type, folder_path, revision, commit_message):
                fake.calls.append(("upload_folder", repo_id, revision, commit_message))
                if not (fake.root / repo_id / (revision or "main")).is_dir() and revision is not None:
                    raise RuntimeError(f"404 Client Error: Revision Not Found: {revision}")
                dest = fake.root / repo_id / (revision or "main")
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(folder_path, dest)
                return f"https://huggingface.co/{repo_id}/commit/fake"

        self.HfApi = HfApi

    def snapshot_download(self, repo_id, revision, cache_dir, allow_patterns, local_files_only, token):
        import fnmatch

        self.calls.append(("snapshot_download", repo_id, revision))
        src = self.root / repo_id / (revision or "main")
        if not src.is_dir():
            raise RuntimeError(f"404 Client Error. Repository Not Found for url: https://huggingface.co/{repo_id}")
        dest = Path(cache_dir) / repo_id.replace("/", "--") / (revision or "main")
        for f in src.rglob("*"):
            rel = f.relative_to(src).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, dest / rel)
        return str(dest)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.HfApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def test_push_and_pull_through_a_fake_hub(tmp_path, fake_hub):
    model = tiny("semigroup")
    info = model.push_to_hub("someone/tiny-fmlm", private=True, token="tok")
    assert info == "https://huggingface.co/someone/tiny-fmlm/commit/fake"
    assert ("create_repo", "someone/tiny-fmlm", "model", True, True) in fake_hub.calls
    assert ("HfApi", "tok") in fake_hub.calls
    pushed = fake_hub.root / "someone/tiny-fmlm/main"
    assert card.front_matter((pushed / "README.md").read_text())["library_name"] == "fmlm"
    assert 'from_pretrained("someone/tiny-fmlm")' in (pushed / "README.md").read_text()
    # A second revision, then pull each by revision: the same samples as the model pushed there.
    other = tiny("semigroup", seed=3)
    other.push_to_hub("someone/tiny-fmlm", revision="v2")
    cache = tmp_path / "cache"
    main_ = fmlm.from_pretrained("someone/tiny-fmlm", device="cpu", cache_dir=cache)
    v2 = fmlm.from_pretrained("someone/tiny-fmlm", revision="v2", device="cpu", cache_dir=cache)
    assert torch.equal(main_.sample_ids(4, 2, seed=1), model.sample_ids(4, 2, seed=1))
    assert torch.equal(v2.sample_ids(4, 2, seed=1), other.sample_ids(4, 2, seed=1))
    assert ("snapshot_download", "someone/tiny-fmlm", "v2") in fake_hub.calls
    assert ("create_branch", "someone/tiny-fmlm", "v2", True) in fake_hub.calls
    # Hub errors are one line.
    with pytest.raises(CheckpointError, match="cannot download someone/missing: RuntimeError: 404"):
        fmlm.from_pretrained("someone/missing", cache_dir=cache)
    with pytest.raises(FmlmError, match="bad Hub repository id"):
        model.push_to_hub("not a repo id")


def test_real_snapshot_download_reads_the_hub_cache(tmp_path):
    """huggingface_hub itself, offline: a model already in its cache layout (models--OWNER--NAME/
    snapshots/COMMIT, refs/REVISION) loads by id and revision without the network."""
    pytest.importorskip("huggingface_hub")
    model = tiny("flm")
    d = model.save_pretrained(tmp_path / "m")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny-flm"
    shutil.copytree(d, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    back = fmlm.from_pretrained("someone/tiny-flm", device="cpu", cache_dir=tmp_path / "cache", local_files_only=True)
    assert torch.equal(back.sample_ids(4, 2, seed=0), model.sample_ids(4, 2, seed=0))
    with pytest.raises(CheckpointError, match="cannot download someone/tiny-flm@v9"):
        fmlm.from_pretrained("someone/tiny-flm", revision="v9", cache_dir=tmp_path / "cache", local_files_only=True)


def test_without_huggingface_hub_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(FmlmError, match=r"pip install 'fmlm\[hub\]'"):
        fmlm.from_pretrained("someone/model")
    with pytest.raises(FmlmError, match=r"pip install 'fmlm\[hub\]'"):
        tiny("flm").push_to_hub("someone/model")
