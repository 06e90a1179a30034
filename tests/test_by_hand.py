"""A method built by hand (``FLM(DiT(...))``) is the method ``fmlm train`` builds and trains."""

import torch

from fmlm.config import build_config
from fmlm.methods.flm import FLM
from fmlm.nn.dit import DiT
from fmlm.schedule import make_schedule
from fmlm.train import Trainer


def test_flm_built_by_hand_trains_as_fmlm_train_does(tmp_path):
    # d_model 8 < V: the embedded noise path draws other numbers than the V-space one, so a
    # different default noise path would show in the loss.
    cfg = build_config(
        "tiny",
        [
            "threads=1",
            "max_steps=1",
            "model.d_model=8",
            "model.n_heads=2",
            "model.cond_dim=8",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    tr = Trainer(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    V, L = cfg.model.vocab_size, cfg.model.max_seq_len
    assert cfg.model.d_model < V
    torch.manual_seed(cfg.train.seed)
    by_hand = FLM(DiT(V, L, n_layers=2, d_model=8, n_heads=2, cond_dim=8), make_schedule("decoding_error", V))
    assert by_hand.noise == tr.method.noise == cfg.train.noise == "embedded"
    theirs = tr.method.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in by_hand.state_dict().items())
    ids = tr.next_batch()
    ours, _ = by_hand.loss(ids, torch.Generator().manual_seed(4))
    loss, _ = tr.method.loss(ids, torch.Generator().manual_seed(4))
    assert ours.item() == loss.item()
    vocab = FLM(by_hand.net, by_hand.schedule, noise="vocab").loss(ids, torch.Generator().manual_seed(4))[0]
    assert vocab.item() != loss.item()  # the test can tell the two noise paths apart
