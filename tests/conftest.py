"""Shared fixtures: the real CT in ../shared/data (skipped when absent) and synthetic datasets."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).absolute().parents[2] / "shared" / "data"  # ../shared/data from the repo root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository (read-only real CT); skips the test when missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real CT data not found at {SHARED_DATA} (the shared data folder is absent)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A factory of small synthetic datasets, written once per (layout, options) per session."""
    from sammix.data.synthetic import write_synthetic_dataset

    made: dict = {}

    def make(layout: str, n_cases: int = 3, **options) -> Path:
        key = (layout, n_cases, tuple(sorted(options.items())))
        if key not in made:
            root = tmp_path_factory.mktemp(f"synth-{layout}")
            made[key] = write_synthetic_dataset(root, layout, n_cases, **options)
        return made[key]

    return make


@pytest.fixture(scope="session")
def untrained_run(tmp_path_factory) -> Path:
    """The untrained model (pretrained parts, random heads, seed 0) as a run folder with its ONNX
    export, made once per session (export and predict tests)."""
    import torch

    from sammix.cli import main
    from sammix.config import RunConfig
    from sammix.models.sammix import SamMix

    run = tmp_path_factory.mktemp("untrained-run")
    torch.manual_seed(0)
    cfg = RunConfig()
    cfg.save(run / "config.yaml")
    torch.save({"model": SamMix(cfg.model, cfg.prep).trained_state()}, run / "best.pt")
    assert main(["export", "--run", str(run)]) == 0
    return run


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no file can be made in, also for root (the immutable flag where chmod is not enough)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = os.access(folder, os.W_OK) and shutil.which("chattr") is not None and \
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    if os.access(folder, os.W_OK) and not immutable:
        pytest.skip("no way to make a read-only folder here")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)
