"""The `sammix` command: one subcommand per job. Heavy imports happen inside each job."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sammix import __version__
from sammix.config import (RUN_WINDOW, SELF_TRAIN_MAX_LABELED, ModelConfig, PrepConfig, RunConfig, TrainConfig,
                            apply_overrides, parse_window)
from sammix.errors import SammixError


def _window(text: str):
    try:
        return parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_prep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=_window, default=PrepConfig.window,
                   help="HU window LEVEL,WIDTH (default 40,400); 'none' keeps 8-bit images as they are")
    p.add_argument("--size", type=int, default=PrepConfig.size, help="model input side in pixels")
    p.add_argument("--middle-fraction", type=float, default=PrepConfig.middle_fraction,
                   help="keep the middle fraction of each volume's slices (paper: 0.3)")
    p.add_argument("--organ", default=PrepConfig.organ, help="target organ (default liver)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="slice cache folder (default $SAMMIX_CACHE or ~/.cache/sammix)")


def _add_set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any other setting of config.yaml, e.g. train.sam_samples_per_epoch=128 or "
                        "model.cam_threshold=0.3; repeatable")


def _labeled(args) -> int:
    """--labeled, by default 50, or 0 (every painted slice) for sparse annotations."""
    if args.labeled is not None:
        return args.labeled
    return 0 if args.annotated_slices else TrainConfig.labeled


def _add_inference_set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.FIELD=VALUE",
                   help="an inference setting of the run, e.g. model.propagate=false (no volume context); repeatable")


def _prep_config(args) -> PrepConfig:
    return PrepConfig(window=args.window, size=args.size, middle_fraction=args.middle_fraction,
                      organ=args.organ)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sammix", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sammix {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="turn a dataset folder into a slice cache")
    p.add_argument("data", type=Path, help="dataset folder (LiTS, MSD, TotalSegmentator, slice folder, NIfTI pairs)")
    _add_prep_options(p)

    p = sub.add_parser("train", help="train SAM-Mix on k labelled slices")
    p.add_argument("--data", type=Path, action="append", required=True,
                   help="dataset with masks (slice labels and the k labelled slices), or sparse masks "
                        "(--annotated-slices), or images only (--slice-labels); repeatable")
    p.add_argument("--cls-only-data", type=Path, action="append", default=[],
                   help="dataset whose slices only train the classifier; repeatable")
    p.add_argument("--slice-labels", type=Path, default=None, metavar="CSV",
                   help="slice labels without masks: rows case,first,last (the organ on exactly those slices, "
                        "0 the most inferior) or case,slice,present (0 or 1); see README")
    p.add_argument("--annotated-slices", type=Path, default=None, metavar="CSV",
                   help="the label volumes are painted on some slices only: only painted slices, and those this "
                        "file (case,slice,present) lists, are labelled; the others get --slice-labels or the "
                        "painted z-extent")
    p.add_argument("--unlabeled-data", type=Path, action="append", default=[], metavar="DIR",
                   help="images only (no labels of any kind): slices that self-training labels and trains SAM on "
                        f"(on by default with at most {SELF_TRAIN_MAX_LABELED} labelled slices; "
                        "--set train.self_train_rounds=N); repeatable")
    p.add_argument("--labeled", type=int, default=None,
                   help=f"k labelled slices; 0: all (default {TrainConfig.labeled}, with --annotated-slices all)")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--out", type=Path, required=True, help="run folder (resumed if it exists)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--backbone", default=ModelConfig.backbone,
                   help="litemedsam (default) | sam_vit_b | sam_vit_l | sam_vit_h")
    p.add_argument("--checkpoint", default=None, help="official SAM checkpoint for sam_vit_* backbones")
    p.add_argument("--classifier", default=ModelConfig.classifier, help="efficientnet_lite0 | resnet38")
    p.add_argument("--lora-rank", type=int, default=ModelConfig.lora_rank)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--nproc", type=int, default=1,
                   help="train data-parallel in this many processes on this machine (torchrun: one per GPU, "
                        "or gloo on the CPU); --batch-size is per process")
    _add_set_option(p)
    _add_prep_options(p)

    p = sub.add_parser("evaluate", help="score a trained run on a dataset (MONAI metrics)")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="METRICS.json")
    p.add_argument("--window", type=_window, default=RUN_WINDOW,
                   help="HU window LEVEL,WIDTH; default 'run' (the run's own); 'none': 8-bit as stored")
    p.add_argument("--split", default="all", choices=["all", "test", "val", "train"],
                   help="which cases of DATA to score: all, or a part of the run's own split")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    _add_inference_set_option(p)
    p.add_argument("--diagnose", action="store_true",
                   help="also score the true box (fine-tuned and pretrained) and name the cause of every "
                        "slice below Dice 0.5, with a figure of them beside METRICS.json")
    p.add_argument("--no-cleanup", action="store_true",
                   help="score the masks as SAM gives them, without predict's clean-up (holes filled)")

    p = sub.add_parser("predict", help="segment CT volumes or images with a trained run")
    p.add_argument("inputs", type=Path, nargs="*",
                   help="NIfTI/NRRD files, DICOM folders, 2D images, or folders of them (walked)")
    p.add_argument("--manifest", type=Path, action="append", default=[], metavar="CSV",
                   help="a CSV of inputs, one a row: INPUT[,OUTPUT_NAME] (relative to the CSV's folder); repeatable")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--preview", action="store_true", help="also write an overlay montage PNG")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip inputs whose mask and record exist from this run and settings (default); "
                        "--no-resume redoes them, as --overwrite does")
    p.add_argument("--overwrite", action="store_true", help="redo every input, replacing its outputs")
    p.add_argument("--num-parts", type=int, default=1,
                   help="split the inputs into this many parts (e.g. SLURM array tasks)")
    p.add_argument("--part-id", type=int, default=0, help="the part this process does, 0..NUM_PARTS-1")
    p.add_argument("--no-cleanup", action="store_true", help="skip the clean-up (holes inside the organ filled, slice by slice)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window", type=_window, default=RUN_WINDOW,
                   help="HU window LEVEL,WIDTH; default 'run' (the run's own); 'none': 8-bit as stored")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8", "bf16"],
                   help="auto: fp32 (exact); int8: the CPU encoder's linear layers in int8, about 1.5x faster, "
                        "not exact (docs/performance.md); bf16: GPU autocast")
    p.add_argument("--slice-step", type=int, default=1,
                   help="SAM sees every Nth organ slice; a slice between two that agree (mask Dice >= 0.9) "
                        "is interpolated from them, otherwise SAM sees it too (with model.propagate: the walk jumps N "
                        "slices where the mask keeps its shape). 1 (default): every slice")
    _add_inference_set_option(p)

    p = sub.add_parser("suggest", help="which slices to label next, written out ready to paint")
    p.add_argument("--data", type=Path, action="append", required=True,
                   help="volumes (image-only, or painted: their paint is kept) or 2D slice folders; repeatable")
    p.add_argument("--run", type=Path, default=None,
                   help="a trained run: SAM's doubt on each slice counts, and the run's own preparation is used "
                        "(default: no run, spread over the pretrained classifier's features alone)")
    p.add_argument("-n", type=int, default=10, help="how many slices to suggest (default 10)")
    p.add_argument("-o", "--out", type=Path, required=True,
                   help="new folder: suggested.csv, montage.png, and the cases to paint (see README)")
    p.add_argument("--slice-labels", type=Path, default=None, metavar="CSV",
                   help="where the organ is (case,first,last or case,slice,present): suggest only from there")
    p.add_argument("--annotated-slices", type=Path, default=None, metavar="CSV",
                   help="slices labelled already (case,slice,present, e.g. an earlier annotated.csv): never "
                        "suggested, and copied into OUT/annotated.csv")
    p.add_argument("--min-gap", type=int, default=5,
                   help="picks in one case are at least this many slices apart, and from labelled slices (default 5)")
    p.add_argument("--prefill", action="store_true",
                   help="the label volumes hold the run's mask on the suggested slices, to correct")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it is not empty")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    _add_prep_options(p)

    p = sub.add_parser("export", help="export a trained run (ONNX)")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN/onnx)")

    p = sub.add_parser("experiment", help="the paper's grid: methods x k x seeds, with a report")
    p.add_argument("--train-data", type=Path, action="append", required=True)
    p.add_argument("--cls-only-data", type=Path, action="append", default=[])
    p.add_argument("--test-data", type=str, action="append", default=[],
                   help="NAME=DIR cross-domain test set; the held-out cases of --train-data are always scored")
    p.add_argument("--methods", default="all", help="comma list, or 'all'")
    p.add_argument("--k", default="5,50,100", help="comma list of labelled-slice counts")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--out", type=Path, required=True, help="experiment folder (finished runs are reused)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--jobs", type=int, default=1, help="cells run at once in separate processes (a GPU fits several)")
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: report the finished cells, mark the others as not run")
    p.add_argument("--num-parts", type=int, default=1,
                   help="split the grid's cells into this many parts (SLURM array tasks, one per GPU)")
    p.add_argument("--part-id", type=int, default=0, help="which part this process runs (0-based)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: merge the cells the parts finished into one report")
    _add_set_option(p)
    _add_prep_options(p)

    p = sub.add_parser("demo", help="run the pipeline end to end on real CT (downloads a LiTS volume if needed)")
    p.add_argument("--data", type=Path, default=None, help="use this dataset instead of the embedded default")
    p.add_argument("--out", type=Path, default=Path("sammix-demo"), help="output folder")
    p.add_argument("--epochs", type=int, default=None)
    return parser


def run(args) -> int:
    if args.command == "prepare":
        from sammix.data.cache import prepare_dataset

        cache = prepare_dataset(args.data, _prep_config(args), cache_dir=args.cache_dir, progress=True)
        print(cache.summary())
        return 0
    if args.command == "train":
        if args.nproc < 1:
            raise SammixError(f"--nproc must be at least 1, got {args.nproc}")
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # relaunch this command under torchrun
            argv = _without_option(sys.argv[1:], "--nproc")
            os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      f"--nproc_per_node={args.nproc}", "-m", "sammix.cli", *argv])
        from sammix.training.train import train

        cfg = RunConfig(
            prep=_prep_config(args),
            model=ModelConfig(backbone=args.backbone, checkpoint=args.checkpoint,
                              classifier=args.classifier, lora_rank=args.lora_rank),
            train=TrainConfig(labeled=_labeled(args), seed=args.seed, epochs=args.epochs,
                              batch_size=args.batch_size, device=args.device),
            data=[str(d) for d in args.data],
            cls_only_data=[str(d) for d in args.cls_only_data],
            slice_labels=str(args.slice_labels) if args.slice_labels else None,
            annotated_slices=str(args.annotated_slices) if args.annotated_slices else None,
            unlabeled_data=[str(d) for d in args.unlabeled_data],
        )
        train(apply_overrides(cfg, args.overrides), args.out, cache_dir=args.cache_dir)
        return 0
    if args.command == "evaluate":
        from sammix.evaluation.evaluate import evaluate_run

        metrics = evaluate_run(args.run, args.data, args.out, window=args.window, split=args.split,
                               device=args.device, diagnose=args.diagnose, overrides=args.overrides,
                               cleanup=not args.no_cleanup)
        print(f"{metrics['n_slices']} slices: Dice {metrics['dice_mean']:.3f} +- {metrics['dice_std']:.3f}, "
              f"HD95 {metrics['hd95_mean']:.1f} px -> {args.out}")
        if args.diagnose:
            d = metrics["diagnosis"]
            causes = ", ".join(f"{k} {v}" for k, v in d.get("failures_by_cause", {}).items())
            print(f"diagnosis: Dice with the CAM prompt {d.get('dice_cam_mean', float('nan')):.3f}, "
                  f"true box {d.get('dice_true_box_mean', float('nan')):.3f}, pretrained + true box "
                  f"{d.get('dice_true_box_pretrained_mean', float('nan')):.3f}; "
                  f"{len(d.get('failures', []))} slices below {d.get('below', 0.5)}: {causes}")
        return 0
    if args.command == "predict":
        from sammix.inference.predict import predict_inputs

        if not args.inputs and not args.manifest:
            raise SammixError("give inputs: paths, or --manifest CSV")
        summary = predict_inputs(args.run, args.inputs, args.out, preview=args.preview,
                                 overwrite=args.overwrite or not args.resume, cleanup=not args.no_cleanup,
                                 batch_size=args.batch_size, window=args.window, device=args.device,
                                 precision=args.precision, slice_step=args.slice_step, manifests=args.manifest,
                                 num_parts=args.num_parts, part_id=args.part_id, overrides=args.overrides)
        return 1 if summary["failed"] else 0
    if args.command == "suggest":
        from sammix.suggest import suggest

        if args.run is not None and _prep_config(args) != PrepConfig():
            raise SammixError("--window, --size, --middle-fraction and --organ come from the run; drop them with --run")
        suggest(args.data, args.out, args.n, run=args.run, prep=_prep_config(args), slice_labels=args.slice_labels,
                annotated_slices=args.annotated_slices, min_gap=args.min_gap, prefill=args.prefill,
                overwrite=args.overwrite, cache_dir=args.cache_dir, device=args.device)
        return 0
    if args.command == "export":
        from sammix.inference.export import export_onnx

        out = export_onnx(args.run, args.out)
        print(f"exported to {out}")
        return 0
    if args.command == "experiment":
        from sammix.evaluation.experiment import run_experiment

        run_experiment(args)
        return 0
    if args.command == "demo":
        from sammix.demo import run_demo

        run_demo(data=args.data, out=args.out, epochs=args.epochs)
        return 0
    raise AssertionError(args.command)


def _without_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except SammixError as exc:
        print(f"sammix {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sammix {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
