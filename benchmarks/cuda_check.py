"""The CUDA path, checked and timed: SAM training steps and whole-model inference, fp32 vs bf16
autocast, at several batch sizes; a 512 x 512 x 200 CT through `predict_volume` (target: under
2 s per CT on one H100); then a short real `train` + `evaluate` on generated CT.

    python benchmarks/cuda_check.py --out cuda_check.json            # on a GPU machine
    python benchmarks/cuda_check.py --device cpu --quick              # the same code path on a CPU

Prints a table (slices/s, peak GPU memory) measured in this run and writes it as JSON."""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sammix.config import ModelConfig, PrepConfig, RunConfig, TrainConfig
from sammix.data.synthetic import synthetic_ct, write_synthetic_dataset
from sammix.evaluation.evaluate import evaluate_run
from sammix.models.sammix import SamMix
from sammix.training.losses import segmentation_loss
from sammix.training.train import train


def synthetic_slices(n: int, size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    hu, mask, _ = synthetic_ct(shape=(size, size, max(n, 8)), seed=0)
    x = np.clip((hu - (40 - 200)) / 400, 0, 1).transpose(2, 1, 0)[:n]
    m = mask.transpose(2, 1, 0)[:n]
    return torch.from_numpy(x.copy()).float().unsqueeze(1), torch.from_numpy(m.copy()).float().unsqueeze(1)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_train_step(model: SamMix, x, m, amp: bool, repeats: int) -> float:
    opt = torch.optim.AdamW([p for p in model.sam.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = segmentation_loss()
    model.sam.train()
    times = []
    for i in range(repeats + 1):
        sync(x.device)
        start = time.perf_counter()
        _, boxes, prompts = model.cam_prompts(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits, scores = model.sam(x, boxes, prompts)
        loss = loss_fn(logits.float()[:, :1], m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(x.device)
        if i:  # the first step warms up kernels and allocators
            times.append(time.perf_counter() - start)
    return len(x) / float(np.median(times))


def time_inference(model: SamMix, x, amp: bool, repeats: int) -> tuple[float, torch.Tensor]:
    times = []
    for i in range(repeats + 1):
        sync(x.device)
        start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out = model.predict_slices(x, gate=False)
        sync(x.device)
        if i:
            times.append(time.perf_counter() - start)
    return len(x) / float(np.median(times)), out["masks"]


def time_volume(model: SamMix, device, batches: list[int], depth: int) -> list[dict]:
    """One 512 x 512 x `depth` CT (generated, 0.75 mm pixels, 2 mm slices) through `predict_volume`
    on the PyTorch engine, fp32 and bf16, at each batch size: seconds per CT (reading excluded),
    every slice through SAM (no gate: an untrained classifier would not gate fairly)."""
    from sammix.data.io import Volume
    from sammix.inference.engine import Engine
    from sammix.inference.predict import predict_volume

    hu, _, affine = synthetic_ct((512, 512, depth), (0.75, 0.75, 2.0), seed=0)
    volume = Volume(hu, affine, Path("synthetic512"))
    rows = []
    print(f"{'volume':<10}{'batch':>6}{'bf16':>6}{'s per CT':>10}{'peak GiB':>10}")
    for precision in ("fp32", "bf16"):
        engine = Engine(model, precision, "torch")
        predict_volume(engine, Volume(hu[:, :, :8], affine, Path("warm-up")), gate=False, batch_size=8)
        for b in batches:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            predict_volume(engine, volume, gate=False, batch_size=b)
            sync(device)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            rows.append({"batch": b, "precision": precision, "seconds_per_ct": seconds, "peak_gib": peak,
                         "slices": depth})
            print(f"{'512x' + str(depth):<10}{b:>6}{str(precision == 'bf16'):>6}{seconds:>10.2f}{peak:>10.2f}",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small batches and few repeats (CPU)")
    parser.add_argument("--out", type=Path, default=Path("cuda_check.json"))
    parser.add_argument("--skip-e2e", action="store_true", help="skip the short train + evaluate run")
    args = parser.parse_args()
    device = torch.device(args.device)
    batches = [2] if args.quick else [4, 8, 16, 32]
    repeats = 1 if args.quick else 3
    info = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "rows": []}
    model = SamMix(ModelConfig(), PrepConfig()).to(device)
    x_all, m_all = synthetic_slices(max(batches))
    x_all, m_all = x_all.to(device), m_all.to(device)
    print(f"{'what':<10}{'batch':>6}{'amp':>6}{'slices/s':>10}{'peak GiB':>10}")
    masks = {}
    for what in ("train", "infer"):
        for b in batches:
            for amp in (False, True):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                x, m = x_all[:b], m_all[:b]
                if what == "train":
                    rate = time_train_step(model, x, m, amp, repeats)
                else:
                    rate, masks[(b, amp)] = time_inference(model, x, amp, repeats)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                info["rows"].append({"what": what, "batch": b, "amp_bf16": amp, "slices_per_s": rate, "peak_gib": peak})
                print(f"{what:<10}{b:>6}{str(amp):>6}{rate:>10.1f}{peak:>10.2f}", flush=True)
    b = max(batches)
    agree = (masks[(b, False)] == masks[(b, True)]).float().mean().item()
    info["bf16_vs_fp32_mask_agreement"] = agree
    print(f"bf16 vs fp32 inference: {agree:.4f} of mask pixels agree")

    info["volume"] = time_volume(model, device, [8] if args.quick else [8, 16, 32, 64], 64 if args.quick else 200)

    if args.skip_e2e:
        args.out.write_text(json.dumps(info, indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:  # the whole loop on the device, end to end
        data = write_synthetic_dataset(Path(tmp) / "data", "lits", n_cases=4, slice_step=1)
        cfg = RunConfig(prep=PrepConfig(size=64 if args.quick else 256), model=ModelConfig(),
                        train=TrainConfig(labeled=4, epochs=2, batch_size=4, device=args.device,
                                          sam_samples_per_epoch=8, val_max_slices=8),
                        data=[str(data)])
        start = time.time()
        train(cfg, Path(tmp) / "run", cache_dir=Path(tmp) / "cache")
        metrics = evaluate_run(Path(tmp) / "run", data, Path(tmp) / "m.json", split="test", device=args.device,
                               cache_dir=Path(tmp) / "cache")
        info["train_evaluate_seconds"] = round(time.time() - start, 1)
        info["synthetic_test_dice"] = metrics["dice_mean"]
        print(f"train (2 epochs) + evaluate on generated CT: {info['train_evaluate_seconds']} s, "
              f"test Dice {metrics['dice_mean']:.3f}")
    args.out.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
