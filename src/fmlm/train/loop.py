"""The :class:`Trainer`: one training loop for every method (see :mod:`fmlm.train`)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

import fmlm.train.distributed as dist_
from fmlm import checkpoint as ckpt
from fmlm.config import RunConfig
from fmlm.data.load import load_data
from fmlm.errors import CheckpointError, ConfigError, FmlmError
from fmlm.io import write_json
from fmlm.methods import build_method
from fmlm.methods.flm import Strata
from fmlm.runtime import autocast_dtype, pick_device
from fmlm.train.checkpoints import find_resume_point, init_weights, restore, save
from fmlm.train.evaluate import evaluate, sample_texts
from fmlm.train.interrupt import _GracefulInterrupt
from fmlm.train.logs import BarTotal, RunLogs, progress_bar
from fmlm.train.optim import EMA, lr_lambda
from fmlm.train.state import (
    TrainState,
    _free_space_note,
    archive_run,
    check_free_space,
    check_resumable,
    check_run_dir,
)


class Trainer:
    """Trains the method of ``cfg`` in ``run_dir``; ``fit()`` resumes when a checkpoint is there.

    A run never silently starts over: if the run directory has checkpoints and none of them is
    valid, the constructor raises :class:`CheckpointError` and changes nothing. ``restart=True``
    (``fmlm train --restart``) starts over on purpose, after moving the old log, checkpoints and
    summary into ``archive/<time>/`` of the run directory.
    """

    clock = staticmethod(time.perf_counter)  # the training-time clock (tests inject their own)

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        resume: bool = True,
        progress: bool = True,
        log=print,
        tokenizer=None,
        restart: bool = False,
        on_step=None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.on_step = on_step  # on_step(trainer, metrics) after every step, its evaluation and save
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.env, device_name = dist_.setup(t.device)
        try:
            self._init(cfg, resume and not restart, progress, log, tokenizer, device_name)
        except BaseException:
            dist_.cleanup(self.env, ok=False)  # every path out destroys the process group
            raise

    def _init(self, cfg: RunConfig, resume: bool, progress: bool, log, tokenizer, device_name: str) -> None:
        t = cfg.train
        main = self.env.is_main
        self.progress = progress and main
        self.log = log if main else (lambda *a, **k: None)
        self.device = pick_device(device_name)
        self.amp = autocast_dtype(t.precision, self.device)
        self.micro_batch, self.accum = dist_.grad_accumulation(t.batch_size, t.micro_batch_size, self.env.world_size)

        # deep=True: a checkpoint with a flipped byte is skipped (with a warning) like a partial one.
        # Rank 0 chooses, so every rank resumes from the same checkpoint (or fails with the same error).
        found, problem = None, None
        if main:
            try:
                check_run_dir(self.run_dir)
                if resume:
                    found = self._find_resume_point()
                else:
                    archive_run(self.run_dir, self.log)
            except FmlmError as e:
                problem = (type(e).__name__, str(e))
        found, problem = dist_.broadcast_object(self.env, (None if found is None else str(found), problem))
        if problem is not None:
            raise {"CheckpointError": CheckpointError, "ConfigError": ConfigError}.get(problem[0], FmlmError)(
                problem[1]
            )
        self.resume_from = None if found is None else Path(found)
        if self.resume_from is not None:
            saved = ckpt.read_json(self.resume_from / "config.json")
            if not isinstance(saved.get("model"), dict):
                raise CheckpointError(f"corrupt checkpoint file {self.resume_from / 'config.json'}: no model section")
            check_resumable(
                {k: v for k, v in saved.items() if k != "model"},
                {k: v for k, v in cfg.to_dict().items() if k != "model"},
            )
            from fmlm.data import load_tokenizer

            tokenizer = load_tokenizer(self.resume_from / "tokenizer")
        # Rank 0 prepares (downloads, tokenises, caches) the data first; the others then read the cache.
        if main:
            self.data = load_data(cfg, tokenizer)
        dist_.barrier(self.env)
        if not main:
            self.data = load_data(cfg, tokenizer)
        cfg.model.vocab_size = self.data.tokenizer.vocab_size
        cfg.model.max_seq_len = cfg.data.seq_len
        if self.resume_from is not None:
            check_resumable(saved["model"], cfg.to_dict()["model"])

        torch.manual_seed(t.seed)  # same initial weights on every rank
        self.method = build_method(cfg, training=True).to(self.device)
        if self.resume_from is None and t.init_from:  # before the EMA copies the weights
            init_weights(self.method, t.init_from, self.log)
        if hasattr(self.method, "bind_tokenizer"):  # e.g. a classifier whose labels come from the text
            self.method.bind_tokenizer(self.data.tokenizer)
        if t.compile:
            self.method.net.compile()
        if main:
            check_free_space(self.run_dir, self.method)
            if cfg.distill.teacher:  # continuing the teacher's run must not prune the student's teacher
                ckpt.pin(cfg.distill.teacher, self.run_dir)
        self.model = dist_.wrap(self.method, self.env, t.distributed, self.device)
        self.opt = torch.optim.AdamW(
            self.method.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.ema = EMA(self.method, t.ema)
        self.gen = torch.Generator(self.device).manual_seed(t.seed)
        if self.env.enabled:  # different dropout masks per rank; the training noise comes from self.gen
            torch.manual_seed(t.seed + 7919 * self.env.rank)
        self.state = TrainState()
        if self.resume_from is not None:
            self._load(self.resume_from)

    @property
    def sharded(self) -> bool:
        return self.env.enabled and self.cfg.train.distributed == "fsdp"

    # ---------------------------------------------------------------- checkpoints
    def _find_resume_point(self) -> Path | None:
        return find_resume_point(self.run_dir)

    def _load(self, path: Path) -> None:
        restore(self, path)

    def save(self) -> Path:
        """Write a checkpoint (rank 0; under FSDP every rank helps gather the state); see :func:`save`."""
        return save(self)

    # ---------------------------------------------------------------- data
    def next_indices(self) -> list[int]:
        """Indices of the next global batch: a pure function of (seed, epoch, position)."""
        n, B = len(self.data.train), self.cfg.train.batch_size
        ids: list[int] = []
        while len(ids) < B:
            if self.state.position >= n:
                self.state.epoch += 1
                self.state.position = 0
            perm = self._perm(self.state.epoch, n)
            take = min(B - len(ids), n - self.state.position)
            ids.extend(perm[self.state.position : self.state.position + take].tolist())
            self.state.position += take
        return ids

    def next_batch(self) -> torch.Tensor:
        """The next global batch (B, L) on this device (single-process use)."""
        return self.data.train.batch(self.next_indices()).to(self.device)

    def parts(self) -> list[tuple[int, torch.Tensor]]:
        """This rank's parts (k, ids) of the next global batch: part k = j·W + rank, j < accumulation.

        Parts of different ranks are disjoint, and together they are the global batch.
        """
        idx, m, W = self.next_indices(), self.micro_batch, self.env.world_size
        out = []
        for j in range(self.accum):
            k = j * W + self.env.rank
            out.append((k, self.data.train.batch(idx[k * m : (k + 1) * m]).to(self.device)))
        return out

    def _perm(self, epoch: int, n: int) -> torch.Tensor:
        if getattr(self, "_perm_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
            self._perm_cache = torch.randperm(n, generator=g)
            self._perm_epoch = epoch
        return self._perm_cache

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, use_ema: bool = True) -> dict:
        """Validation metrics over fixed batches with fixed noise (comparable across steps)."""
        return evaluate(self, use_ema)

    def _evaluate_ranks(self) -> dict:
        """Rank 0 evaluates while the others wait (all ranks take part under FSDP)."""
        val = self.evaluate() if (self.env.is_main or self.sharded) else {}
        dist_.barrier(self.env)
        return val

    def _autocast(self):
        if self.amp is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp)

    # ---------------------------------------------------------------- one optimiser step
    def _forward_backward(self) -> tuple[dict, float]:
        """Loss and gradients of one global batch over this rank's parts; returns (metrics, grad norm)."""
        parts = self.parts()
        K = self.accum * self.env.world_size
        if K > 1:  # one seed per step (same on every rank) -> one generator per part
            step_seed = int(torch.randint(0, 2**62, (), generator=self.gen, device=self.device))
        sums: dict[str, torch.Tensor] = {}
        for j, (k, ids) in enumerate(parts):
            with dist_.no_sync(self.model, sync=j == len(parts) - 1):
                if K == 1:
                    gen, strata = self.gen, None
                else:
                    gen = torch.Generator(self.device).manual_seed((step_seed + 1_000_003 * (k + 1)) % 2**63)
                    strata = Strata(k, K, torch.Generator(self.device).manual_seed(step_seed))
                with self._autocast():
                    loss, metrics = self.model(ids, gen, strata=strata)
                # Non-finite losses still go through backward: their NaN gradients reach every rank
                # through the all-reduce, so all ranks skip the step together.
                (loss / self.accum).backward()
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + torch.as_tensor(v, dtype=torch.float32).detach()
            # The loss that was back-propagated decides whether the step is finite.
            sums[" objective"] = sums.get(" objective", 0.0) + loss.detach().float()
        metrics = dist_.mean_metrics(self.env, sums, self.accum)
        t = self.cfg.train
        gnorm = torch.nn.utils.clip_grad_norm_(self.method.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        return metrics, float(dist_.full_tensor(gnorm))

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Train to ``max_steps`` (or the time budget); Ctrl-C finishes the current step, evaluation or
        save, writes a checkpoint and returns with ``interrupted`` set (a second Ctrl-C stops at once)."""
        ok = False
        try:
            with _GracefulInterrupt(self) as self._interrupt:
                out = self._fit()
            ok = True
            return out
        except OSError as e:  # the log, config or summary could not be written (disk full, read-only)
            where = f" {e.filename}" if getattr(e, "filename", None) else f" in {self.run_dir}"
            raise FmlmError(f"cannot write{where}: {e.strerror or e}{_free_space_note(self.run_dir)}") from None
        finally:
            if getattr(self, "_logs", None) is not None:
                self._logs.close()  # closes (flushes) the writers on every path out; a second close does nothing
            dist_.cleanup(self.env, ok=ok)

    def _stop_requested(self) -> bool:
        """Whether Ctrl-C was pressed (rank 0's word counts, so all ranks stop at the same step)."""
        flag = self._interrupt.requested
        return bool(dist_.broadcast_object(self.env, flag)) if self.env.enabled else flag

    def _fit(self) -> dict:
        cfg, t, st = self.cfg, self.cfg.train, self.state
        main = self.env.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.json")
        self._logs = logs = RunLogs(self.run_dir, cfg, st.step, enabled=main)  # train.log_to (fmlm.train.logs)
        n_params = sum(p.numel() for p in self.method.parameters())
        where = f"device {self.device}"
        if self.env.enabled:
            where = (
                f"{self.env.world_size} ranks ({t.distributed}, {self.env.backend}), micro-batch "
                f"{self.micro_batch} x {self.accum} accumulation, device {self.device}"
            )
        self.log(
            f"{cfg.train.method}: {n_params / 1e6:.2f}M parameters, vocab {cfg.model.vocab_size}, "
            f"L={cfg.data.seq_len}, {len(self.data.train)} train / {len(self.data.val)} val blocks, "
            f"{where}, precision {self.amp or 'fp32'}"
        )
        budget = t.max_minutes * 60.0 if t.max_minutes > 0 else math.inf
        self.method.train()
        bar_total = BarTotal(t.max_steps, budget, st.step, st.elapsed)
        self.bar = bar = progress_bar(t.max_steps, st.step, self.progress)
        tokens_per_step = t.batch_size * cfg.data.seq_len
        window_t, window_tok = self.clock(), 0
        session_start, elapsed0 = self.clock(), st.elapsed
        last_saved = st.step if self.resume_from is not None else -1
        interrupted = False

        def evaluated() -> None:  # the validation record, and sample texts for the writers that show them
            write({"step": st.step, **st.last_val})
            if logs.wants_samples and not self.sharded and hasattr(self.method, "sample"):
                logs.samples(st.step, sample_texts(self))

        write = logs.write

        try:
            while st.step < t.max_steps and st.elapsed < budget:
                if self._stop_requested():
                    interrupted = True
                    self.log("interrupted: saving a checkpoint")
                    break
                self.opt.zero_grad(set_to_none=True)
                metrics, gnorm = self._forward_backward()
                if not torch.isfinite(metrics.pop(" objective")):
                    self._bad_step("loss")
                    continue
                if not math.isfinite(gnorm):
                    self._bad_step("gradient")
                    continue
                st.bad_steps = 0
                self.opt.step()
                self.sched.step()
                self.ema.update(self.method, st.step)
                if hasattr(self.method, "on_step_end"):
                    self.method.on_step_end()
                st.step += 1
                st.tokens += tokens_per_step
                window_tok += tokens_per_step
                # Rank 0's clock decides the time budget for everyone.
                elapsed = elapsed0 + self.clock() - session_start
                st.elapsed = float(dist_.broadcast_object(self.env, elapsed)) if budget < math.inf else elapsed
                bar.total = bar_total(st.step, st.elapsed)  # the bound that ends the run first
                bar.update(1)
                if st.step % t.log_every == 0 or st.step == t.max_steps:
                    now = self.clock()
                    rec = {
                        "step": st.step,
                        **{k: float(v) for k, v in metrics.items()},
                        "lr": self.sched.get_last_lr()[0],
                        "grad_norm": gnorm,
                        "tokens_per_s": window_tok / max(now - window_t, 1e-9),
                        "tokens": st.tokens,
                        "elapsed_s": round(st.elapsed, 2),
                    }
                    window_t, window_tok = now, 0
                    write(rec)
                    post = dict(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    if budget < math.inf:  # the step bar's ETA ignores the time budget; show what is left
                        post["time_left"] = time.strftime("%H:%M:%S", time.gmtime(max(0.0, budget - st.elapsed)))
                    bar.set_postfix(post)
                if st.step % t.eval_every == 0:
                    st.last_val = self._evaluate_ranks()
                    evaluated()
                    if self.progress:
                        bar.write(
                            f"step {st.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in st.last_val.items()),
                            file=sys.stderr,
                        )  # stdout is kept for the JSON summary
                if st.step % t.save_every == 0:
                    self.save()
                    last_saved = st.step
                if self.on_step is not None:
                    self.on_step(self, metrics)
        finally:
            bar.close()
        has_ckpt = bool(ckpt.list_checkpoints(self.run_dir)) if main else True
        if dist_.broadcast_object(self.env, st.step != last_saved or not has_ckpt):
            if not interrupted:
                st.last_val = self._evaluate_ranks()
                evaluated()
            self.save()
        interrupted = interrupted or self._stop_requested()  # Ctrl-C during the final evaluation or save
        logs.close()
        summary = {
            "run_dir": str(self.run_dir),
            "step": st.step,
            "tokens": st.tokens,
            "train_seconds": round(st.elapsed, 2),
            "tokens_per_s": round(st.tokens / max(st.elapsed, 1e-9), 1),
            "parameters": n_params,
            "interrupted": interrupted,
            "world_size": self.env.world_size,
            "rank": self.env.rank,
            **st.last_val,
        }
        if main:
            write_json(self.run_dir / "summary.json", summary)
        return summary

    def _bad_step(self, what: str) -> None:
        self.state.bad_steps += 1
        self.opt.zero_grad(set_to_none=True)
        if self.state.bad_steps > self.cfg.train.max_bad_steps:
            raise FmlmError(
                f"{self.state.bad_steps} non-finite {what} values in a row at step "
                f"{self.state.step}; lower train.lr or check the data"
            )
