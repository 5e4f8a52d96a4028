"""A run folder: the one owner of its files' names and formats.

    RUN/config.yaml    the resolved settings (RunConfig, or a baseline's config)
    RUN/split.json     the case split {"train": [...], "val": [...], "test": [...]}
    RUN/labeled.json   the k labelled slices [{"case", "slice"}]
    RUN/log.jsonl      one JSON row per epoch (and per calibration)
    RUN/last.pt        the resume point
    RUN/best.pt        the best validation weights, with the gate and CAM thresholds chosen on
                       validation (what `SamMix.load`, evaluate, predict and export read)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from sammix.data.io import atomic_path, write_json
from sammix.errors import InputError, SammixError, one_line


class RunFolder:
    CONFIG, SPLIT, LABELED, LOG, LAST, BEST = "config.yaml", "split.json", "labeled.json", "log.jsonl", "last.pt", "best.pt"

    def __init__(self, path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def best(self) -> Path:
        return self.path / self.BEST

    @property
    def last(self) -> Path:
        return self.path / self.LAST

    # -- reading a finished run ---------------------------------------------------------------
    def check(self, weights: str = BEST) -> "RunFolder":
        """This folder, once it holds a config and the weights (else a one-line error)."""
        if not self.config.is_file():
            raise InputError(self.path, f"not a sammix run folder (no {self.CONFIG})")
        if not (self.path / weights).is_file():
            raise InputError(self.path / weights, "no trained weights (has training finished an epoch?)")
        return self

    def load_weights(self, name: str = BEST) -> dict:
        """A weights file (best.pt, last.pt) as its dict; a truncated or corrupt file is a one-line error."""
        import torch

        path = self.path / name
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001  zip, pickle and I/O errors alike: the file is unusable
            raise InputError(path, f"cannot read the weights, truncated or corrupt? ({one_line(exc)})") from None
        if not isinstance(state, dict):
            raise InputError(path, f"not a weights file (holds a {type(state).__name__}, not a dict)")
        return state

    def split(self) -> dict:
        path = self.path / self.SPLIT
        if not path.is_file():
            raise InputError(path, "the run has no case split (not trained by sammix?)")
        return json.loads(path.read_text())

    def log(self) -> list[dict]:
        path = self.path / self.LOG
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- writing during training ----------------------------------------------------------------
    def prepare(self, cfg) -> bool:
        """Create the folder with `cfg` as its config, or check that it holds this same config.
        True when there is a resume point."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.config.exists():
            try:
                saved = asdict(type(cfg).load(self.config))
            except Exception:  # noqa: BLE001  another kind of run's config, or an unreadable one
                saved = None
            if saved != asdict(cfg):
                raise SammixError(f"{self.path}: this run folder holds a different config ({self.config}); "
                                  "use another --out, or delete it to start over")
            return self.last.exists()
        with atomic_path(self.config) as tmp:
            cfg.save(tmp)
        return False

    def write_split(self, split: dict, labeled: list[dict]) -> None:
        write_json(split, self.path / self.SPLIT)
        write_json(labeled, self.path / self.LABELED)

    def append_log(self, row: dict) -> None:
        with open(self.path / self.LOG, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def save(self, state: dict, name: str) -> None:
        """A weights file, atomically."""
        import torch

        with atomic_path(self.path / name) as tmp:
            torch.save(state, tmp)
