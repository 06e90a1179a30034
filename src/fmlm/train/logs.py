"""Training logs (``train.log_to``) and the progress bar's honest total.

``train.log_to`` is a comma list of writers, each fed the same records (the step, the training
scalars every ``log_every`` steps, the validation metrics at every evaluation):

* ``jsonl`` (the default): ``log.jsonl`` in the run directory, one JSON record a line. A resumed
  run first drops the records past its checkpoint's step, so the log reads like that of an
  uninterrupted run.
* ``tensorboard``: event files in ``tensorboard/`` (``torch.utils.tensorboard``; the
  ``tensorboard`` extra), every scalar under its record key, and the sample texts of each
  evaluation as text ``samples``. A resumed run opens its writer with ``purge_step`` = the step
  after the checkpoint's, so TensorBoard hides the events the killed session wrote past it: no step
  twice, none lost.
* ``wandb``: a Weights & Biases run (the ``wandb`` extra) in ``wandb/`` of the run directory,
  named after it, with the resolved config; its mode comes from wandb's settings
  (``WANDB_MODE=offline`` for a local run directory only). The run id is kept in
  ``wandb.json``, so a resumed run continues the same run. wandb cannot take back history,
  so a resumed session skips the steps the killed session had already logged (``wandb.json``
  holds the last one) and logs from the step after: no step twice or lost, and the skipped
  records keep the killed session's values (equal to the recomputed ones for a deterministic
  resume, except the timings). Offline, each session writes its own ``offline-run-*`` folder
  under the same id (``wandb sync`` uploads them into one run). ``wandb.json`` is updated as
  records are handed to wandb, which writes them from its own process: after a hard kill
  (SIGKILL, power loss) records it had not yet written are missing for those steps. An
  exception or Ctrl-C closes the run normally.

Sample texts at evaluation (:func:`fmlm.train.evaluate.sample_texts`) are drawn only when a
writer other than ``jsonl`` is on. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
from pathlib import Path

from fmlm.config.checks import parse_log_to
from fmlm.errors import FmlmError
from fmlm.io import write_json
from fmlm.train.state import _truncate_log


def _scalars(rec: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in rec.items()
        if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class JsonlLog:
    def __init__(self, run_dir: Path, step: int):
        path = run_dir / "log.jsonl"
        _truncate_log(path, step)
        self.f = open(path, "a")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def samples(self, step: int, texts: list[str]) -> None:
        pass

    def close(self) -> None:
        self.f.close()


class TensorBoardLog:
    def __init__(self, run_dir: Path, step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FmlmError(
                "train.log_to=tensorboard needs the tensorboard package: pip install 'fmlm[tensorboard]'"
            ) from None
        # purge_step: on reading, TensorBoard drops the events at or past it that an earlier session wrote
        # (this session's first record is the step after the checkpoint's).
        self.w = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=step + 1)

    def write(self, rec: dict) -> None:
        for k, v in _scalars(rec).items():
            self.w.add_scalar(k, v, rec["step"])
        self.w.flush()

    def samples(self, step: int, texts: list[str]) -> None:
        body = "\n\n".join(f"{i}. `{t}`" for i, t in enumerate(texts, start=1))
        self.w.add_text("samples", body, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class WandbLog:
    def __init__(self, run_dir: Path, cfg, step: int):
        try:
            import wandb
        except ImportError:
            raise FmlmError("train.log_to=wandb needs the wandb package: pip install 'fmlm[wandb]'") from None
        self.wandb, self.state_path = wandb, run_dir / "wandb.json"
        state = {}
        if self.state_path.is_file():
            try:
                state = json.loads(self.state_path.read_text())
            except ValueError:
                state = {}
        fresh = step == 0 or not isinstance(state.get("id"), str)
        run_id = secrets.token_hex(4) if fresh else state["id"]
        self.skip_to = -1 if fresh else int(state.get("last_step", -1))  # logged by the killed session
        self.last = self.skip_to
        self.run = wandb.init(
            project="fmlm",
            name=run_dir.name,
            id=run_id,
            dir=str(run_dir),
            config=cfg.to_dict(),
            resume="allow",
        )
        self._save(run_id)

    def _save(self, run_id: str | None = None) -> None:
        write_json(self.state_path, {"id": run_id or self.run.id, "last_step": self.last})

    def write(self, rec: dict) -> None:
        step = int(rec["step"])
        if step <= self.skip_to:
            return
        self.run.log(_scalars(rec), step=step)
        if step > self.last:
            self.last = step
            self._save()

    def samples(self, step: int, texts: list[str]) -> None:
        if step <= self.skip_to:
            return
        table = self.wandb.Table(columns=["sample"], data=[[t] for t in texts])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLogs:
    """The writers of ``train.log_to`` for a run resuming at ``step`` (none when not ``enabled``)."""

    def __init__(self, run_dir: Path, cfg, step: int, enabled: bool = True):
        names = parse_log_to(cfg.train.log_to)
        self.writers: list = []
        if not enabled:
            return
        try:
            for name in names:
                if name == "jsonl":
                    self.writers.append(JsonlLog(run_dir, step))
                elif name == "tensorboard":
                    self.writers.append(TensorBoardLog(run_dir, step))
                else:
                    self.writers.append(WandbLog(run_dir, cfg, step))
        except BaseException:
            self.close()
            raise

    @property
    def wants_samples(self) -> bool:
        return any(not isinstance(w, JsonlLog) for w in self.writers)

    def write(self, rec: dict) -> None:
        for w in self.writers:
            w.write(rec)

    def samples(self, step: int, texts: list[str]) -> None:
        for w in self.writers:
            w.samples(step, texts)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.writers = []


class BarTotal:
    """The progress bar's total: ``max_steps``, or, when a time budget (seconds) will end the run
    first, the step it will end at, estimated from this session's measured rate (steps per second
    of training time, evaluations and saves included), so the bar's ETA is the time left."""

    def __init__(self, max_steps: int, budget: float, step0: int, elapsed0: float):
        self.max_steps, self.budget, self.step0, self.elapsed0 = max_steps, budget, step0, elapsed0

    def __call__(self, step: int, elapsed: float) -> int:
        if self.budget == math.inf:
            return self.max_steps
        if elapsed >= self.budget:
            return step  # the time is up: this step is the last
        done, spent = step - self.step0, elapsed - self.elapsed0
        if done <= 0 or spent <= 0:
            return self.max_steps
        return max(step, min(self.max_steps, step + round((self.budget - elapsed) * done / spent)))


def progress_bar(max_steps: int, step: int, enabled: bool):
    """The training bar (tqdm, on stderr): steps from ``step``; :class:`BarTotal` keeps its total honest."""
    from tqdm.auto import tqdm

    return tqdm(
        total=max_steps,
        initial=step,
        disable=not enabled,
        dynamic_ncols=True,
        unit="step",
        desc="train",
        mininterval=0.5 if os.isatty(2) else 30.0,
    )
