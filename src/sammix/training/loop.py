"""What `Trainer` (SAM-Mix) and `BaselineTrainer` share: the run folder, seeding, the epoch loop,
the best and last checkpoints (with every random state, so a resumed run ends with exactly the
weights of an uninterrupted one) and the log."""

from __future__ import annotations

import random
import time

import numpy as np
import torch
from tqdm import tqdm

from sammix.config import resolve_device
from sammix.runfolder import RunFolder
from sammix.training import distributed


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class EpochTrainer:
    """A run folder trained epoch by epoch. Subclasses build their data and model in __init__
    (after this one) and call `resume()`, then provide:

    * `name`: shown in the progress bar; `steps_per_epoch()`: slices per epoch;
    * `run_epoch(bar) -> {loss name: value}` and `validate() -> {metric: value}`;
    * `score(losses, val)`: what picks the best epoch (higher is better);
    * `model_state()` / `load_model_state(state)`, `best_weights()`: what best.pt holds;
    * `optimizers()`: {name in last.pt: object with state_dict / load_state_dict};
    * optionally `self.rng` (a numpy Generator), `total_epochs()` (default train.epochs),
      `before_epoch(epoch)` and `finish()` (after the last epoch).
    """

    name = ""

    def __init__(self, cfg, out):
        self.cfg, self.out = cfg, RunFolder(out)
        self.device = resolve_device(distributed.init_from_env(cfg.train.device))
        self.rank, self.world = distributed.world()
        self.main = self.rank == 0  # the one rank that writes the run folder and shows progress
        if self.main:
            self.resuming = self.out.prepare(cfg)
        distributed.barrier()
        if not self.main:
            self.resuming = self.out.last.exists()
        self.gen = seed_everything(cfg.train.seed)
        self.rng: np.random.Generator | None = None
        self.epoch, self.best = 0, float("-inf")  # a run without validation cases keeps the lowest loss

    def record_split(self, data, split: dict, labeled) -> None:
        if self.main:
            self.out.write_split(split, [{"case": data.case[i], "slice": int(data.slice_index[i])} for i in labeled])

    # -- checkpoints ------------------------------------------------------------------------
    def _random_states(self) -> dict:
        states = {"torch": torch.get_rng_state(), "gen": self.gen.get_state(), "numpy": np.random.get_state(),
                  "python": random.getstate()}
        if self.rng is not None:
            states["np"] = self.rng.bit_generator.state
        return states

    def _save_last(self) -> None:
        if not self.main:
            return
        self.out.save({"epoch": self.epoch, "best": self.best, "model": self.model_state(),
                       **{k: v.state_dict() for k, v in self.optimizers().items()},
                       "rng": self._random_states()}, RunFolder.LAST)

    def resume(self) -> None:
        """Load last.pt when the run folder has one (call once the model and optimizers exist)."""
        if not self.resuming:
            return
        state = self.out.load_weights(RunFolder.LAST)
        self.load_model_state(state["model"])
        for key, obj in self.optimizers().items():
            obj.load_state_dict(state[key])
        rng = state["rng"]
        if self.rng is not None:
            self.rng.bit_generator.state = rng["np"]
        torch.set_rng_state(rng["torch"])
        self.gen.set_state(rng["gen"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.epoch, self.best = state["epoch"], state["best"]

    # -- the loop ---------------------------------------------------------------------------
    def total_epochs(self) -> int:
        return self.cfg.train.epochs

    def before_epoch(self, epoch: int) -> None:
        """Called on every rank before epoch `epoch` (1-based) runs, resumed or not."""

    def finish(self) -> None:
        pass

    def fit(self) -> dict:
        epochs = self.total_epochs()
        if self.epoch >= epochs:
            if self.main:
                print(f"{self.out}: already trained for {self.epoch} epochs (best validation score {self.best:.3f})")
                self.finish()
            return {"best_val_score": self.best}
        if self.resuming and self.main:
            print(f"resuming {self.out} after epoch {self.epoch}")
        for epoch in range(self.epoch + 1, epochs + 1):
            self.before_epoch(epoch)
            start = time.time()
            desc = f"{self.name} epoch {epoch}/{epochs}".strip()
            with tqdm(total=self.steps_per_epoch(), desc=desc, unit="slice", leave=False, disable=not self.main) as bar:
                losses = self.run_epoch(bar)
            val = self.validate_once()
            self.epoch = epoch
            row = {"epoch": epoch, **losses, **val, "seconds": round(time.time() - start, 1)}
            score = self.score(losses, val)
            if score > self.best:
                self.best = score
                if self.main:
                    self.out.save({"model": self.best_weights(), "epoch": epoch, **val}, RunFolder.BEST)
                row["best"] = True
            self._save_last()
            if self.main:
                self.out.append_log(row)
                tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            distributed.barrier()
        if self.main:
            print(f"run folder: {self.out} (best validation score {self.best:.3f})")
            self.finish()
        distributed.barrier()
        return {"best_val_score": self.best}

    def validate_once(self) -> dict:
        """`validate` on the main rank, its result (and the thresholds it set) on every rank."""
        val = self.validate() if self.main else None
        val = distributed.broadcast(val)
        self.after_validation(val)
        return val

    def after_validation(self, val: dict) -> None:
        """What the other ranks must take over from the main rank's validation (thresholds)."""
