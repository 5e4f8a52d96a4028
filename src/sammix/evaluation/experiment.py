"""`sammix experiment`: the paper's comparison as one command.

A grid of cells (method x k x seed) under one folder:

    OUT/experiment.json          what was asked, resolved
    OUT/experiment.log           one line per cell event (trained, reused, failed, evaluated)
    OUT/runs/<cell>/             an ordinary run folder (config.yaml, split.json, ..., best.pt)
    OUT/runs/<cell>/cell.json    status, error, seconds spent training and evaluating
    OUT/runs/<cell>/eval/<test>.json|.npz   per-slice scores and the predicted masks
    OUT/report.md, results.csv, dice_boxplot.png, qualitative.png, cam.png

Every cell trains on the same data with the same case split (TrainConfig.split_seed) and is scored
by the same metric code (`evaluate.score_predictions`, on the masks cleaned up as `predict` cleans
them) on the organ-present slices (the paper's per-slice scores) of the held-out test cases of the
training data ("in-domain") and of each --test-data set ("cross-domain"). Running
the same command again reuses finished runs and evaluations; a cell that fails is recorded with its
error and the grid goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sammix.config import ModelConfig, PrepConfig, RunConfig, TrainConfig
from sammix.data.io import write_json
from sammix.errors import InputError, SammixError
from sammix.evaluation.methods import METHODS
from sammix.evaluation.report import write_report
from sammix.runfolder import RunFolder


IN_DOMAIN, CROSS_DOMAIN = "in-domain", "cross-domain"
N_QUALITATIVE = 4  # slices shown in qualitative.png and cam.png, spread over the test sets


@dataclass(frozen=True)
class Cell:
    method: str
    k: int | None = None
    seed: int | None = None

    @property
    def name(self) -> str:
        return self.method + (f"-k{self.k}" if self.k is not None else "") + \
            (f"-s{self.seed}" if self.seed is not None else "")

    @property
    def short(self) -> str:
        return METHODS[self.method].short + (f" k{self.k}" if self.k is not None else "")


@dataclass
class ExperimentSpec:
    """Everything a grid depends on. `train` and `model` are the shared settings; each cell sets
    its own labeled (k) and seed. `nets` overrides the baseline network settings by arch."""

    train_data: list[str]
    out: str
    cls_only_data: list[str] = field(default_factory=list)
    test_data: dict[str, str] = field(default_factory=dict)  # name -> folder (cross-domain)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    ks: list[int] = field(default_factory=lambda: [5, 50, 100])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    prep: PrepConfig = field(default_factory=PrepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    nets: dict = field(default_factory=dict)  # arch -> models.baselines.NetConfig
    nnunet_trainer: str = "nnUNetTrainer"  # nnU-Net's own schedule (1000 x 250 steps); see docs/results.md
    cache_dir: str | None = None
    eval_batch_size: int = 8
    jobs: int = 1  # cells run at once, each in its own process (a GPU fits several)
    no_train: bool = False  # report what is finished; cells without a finished run are not run
    num_parts: int = 1  # the grid split into parts (SLURM array tasks, GPUs): this process runs
    part_id: int = 0  # every num_parts-th cell from part_id; parts write no report
    report_only: bool = False  # run nothing: merge the cells that parts (or earlier runs) finished
    command: str = ""

    def cells(self) -> list[Cell]:
        cells = []
        for name in self.methods:
            m = METHODS[name]
            for k in (self.ks if m.uses_k else [None]):
                for seed in (self.seeds if m.seeded else [None]):
                    cells.append(Cell(name, k, seed))
        return cells

    def my_cells(self) -> list[Cell]:
        """The cells this process runs: every one, or those of part `part_id` of `num_parts`
        (round robin over `cells()`, so P parts cover the grid exactly once)."""
        return [] if self.report_only else self.cells()[self.part_id::self.num_parts]


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SammixError(f"--{what} expects a comma list of integers, got {text!r}") from None
    if not values:
        raise SammixError(f"--{what} is empty")
    return values


def parse_methods(text: str) -> list[str]:
    """'unet,sammix' -> those; 'all' stands for every method but nnunet-full ('all,nnunet-full')."""
    names = []
    for name in (m.strip() for m in text.split(",")):
        names += [m.name for m in METHODS.values() if m.in_all] if name == "all" else [name] if name else []
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise SammixError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from "
                          f"{', '.join(METHODS)} or 'all'")
    return list(dict.fromkeys(names))


def parse_test_data(items: list[str]) -> dict[str, str]:
    sets: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise SammixError(f"--test-data expects NAME=DIR, got {item!r}")
        if name in sets:
            raise SammixError(f"--test-data name {name!r} is given twice")
        sets[name] = folder
    return sets


def command_line(args) -> str:
    """The resolved command, every option spelled out, so the report shows how to rerun it."""
    parts = ["sammix", "experiment"]
    for d in args.train_data:
        parts += ["--train-data", str(d)]
    for d in args.cls_only_data:
        parts += ["--cls-only-data", str(d)]
    for t in args.test_data:
        parts += ["--test-data", str(t)]
    window = "none" if args.window is None else f"{args.window[0]:g},{args.window[1]:g}"
    parts += ["--methods", args.methods, "--k", args.k, "--seeds", args.seeds, "--epochs", str(args.epochs),
              "--out", str(args.out), "--device", args.device, "--window", window, "--size", str(args.size),
              "--middle-fraction", f"{args.middle_fraction:g}", "--organ", args.organ, "--jobs", str(args.jobs)]
    for item in args.overrides:
        parts += ["--set", item]
    if args.cache_dir is not None:
        parts += ["--cache-dir", str(args.cache_dir)]
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("SAMMIX_NNUNET_BIN", "SAMMIX_NNUNET_TRAINER")
           if k in os.environ and "nnunet-full" in parse_methods(args.methods)]
    return " ".join([*env, shlex.join(parts)])


def spec_from_args(args) -> ExperimentSpec:
    methods = parse_methods(args.methods)
    ks = _ints(args.k, "k") if any(METHODS[m].uses_k for m in methods) else []
    if any(k <= 0 for k in ks):
        raise SammixError(f"--k values must be positive, got {args.k}")
    if args.jobs < 1:
        raise SammixError(f"--jobs must be at least 1, got {args.jobs}")
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise SammixError(f"--part-id must be in 0..{args.num_parts - 1} for --num-parts {args.num_parts}")
    from sammix.config import apply_overrides

    # --set reaches the shared settings of every cell: prep, model (SAM cells), train
    base = apply_overrides(RunConfig(prep=PrepConfig(window=args.window, size=args.size,
                                                     middle_fraction=args.middle_fraction, organ=args.organ),
                                     train=TrainConfig(epochs=args.epochs, device=args.device)), args.overrides)
    return ExperimentSpec(
        train_data=[str(d) for d in args.train_data], out=str(args.out),
        cls_only_data=[str(d) for d in args.cls_only_data], test_data=parse_test_data(args.test_data),
        methods=methods, ks=ks, seeds=_ints(args.seeds, "seeds"),
        prep=base.prep, train=base.train, model=base.model,
        cache_dir=None if args.cache_dir is None else str(args.cache_dir),
        nnunet_trainer=os.environ.get("SAMMIX_NNUNET_TRAINER", "nnUNetTrainer"),
        jobs=args.jobs, no_train=args.no_train, num_parts=args.num_parts, part_id=args.part_id,
        report_only=args.report_only, command=command_line(args),
    )


def run_experiment(args) -> dict:
    """The CLI entry: build the spec from the parsed options, run the grid, write the report.
    Raises SammixError (exit 2) after writing the report when some cells failed."""
    summary = run_grid(spec_from_args(args))
    if summary["report"] is None:
        print(f"part {args.part_id} of {args.num_parts}: {summary['n_cells']} cells, "
              f"{len(summary['failed'])} failed; merge the parts with --report-only")
        return summary
    if summary["failed"]:
        raise SammixError(f"{len(summary['failed'])} of {summary['n_cells']} cells failed "
                          f"({', '.join(summary['failed'])}); see {summary['report']}")
    print(f"report: {summary['report']}")
    return summary


# ------------------------------------------------------------------------------------- test sets

@dataclass
class TestSet:
    __test__ = False  # not a pytest class

    name: str
    domain: str
    paths: list[str]
    slices: object  # training.slices.SliceSet
    idx: np.ndarray  # the slices scored
    qual: np.ndarray  # positions in idx shown in the figures (organ-present slices)

    def present(self) -> np.ndarray:
        return _present(self.slices, self.idx)


def _spread(n: int, k: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))


def _present(slices, idx=None) -> np.ndarray:
    idx = np.arange(len(slices)) if idx is None else idx
    return slices.has_mask[idx] & (slices.labels[idx] > 0)


def load_test_sets(spec: ExperimentSpec) -> tuple[list[TestSet], dict]:
    """The organ-present slices of the held-out test cases of the training data (in-domain) and of
    each --test-data set (cross-domain): the slices the paper's per-slice scores are taken over."""
    from sammix.data.splits import split_cases
    from sammix.training.slices import load_sources

    cache = Path(spec.cache_dir) if spec.cache_dir else None
    for folder in [*spec.train_data, *spec.cls_only_data, *spec.test_data.values()]:
        if not Path(folder).exists():
            raise InputError(folder, "not found")
    data = load_sources(spec.train_data, spec.prep, cache, masks=True)
    t = spec.train
    split = split_cases(sorted(set(data.case)), t.val_fraction, t.test_fraction, seed=t.split_seed)
    in_name = "+".join(Path(d).name for d in spec.train_data)
    if in_name in spec.test_data:
        raise SammixError(f"--test-data name {in_name!r} is the name of the in-domain test set; use another")
    test = data.indices_for(split["test"])
    sets = [TestSet(in_name, IN_DOMAIN, list(spec.train_data), data, test[_present(data, test)], np.array([]))]
    for name, folder in spec.test_data.items():
        s = load_sources([folder], spec.prep, cache, masks=True)
        sets.append(TestSet(name, CROSS_DOMAIN, [folder], s, np.flatnonzero(_present(s)), np.array([])))
    per_set = -(-N_QUALITATIVE // len(sets))
    for ts in sets:
        if not ts.present().any():
            raise SammixError(f"test set {ts.name} ({', '.join(ts.paths)}) has no slice with a "
                              f"{spec.prep.organ} mask to score")
        # figure slices: spread over the set, skipping the smallest organ cross-sections (chosen
        # from the ground truth alone, before any model has run)
        present = np.flatnonzero(ts.present())
        area = ts.slices.masks[ts.idx[present]].reshape(len(present), -1).sum(1)
        present = present[area >= np.quantile(area, 0.25)]
        ts.qual = present[_spread(len(present), per_set)]
    return sets, split


# ---------------------------------------------------------------------------------------- cells

def cell_config(spec: ExperimentSpec, cell: Cell):
    """The run config of one cell (config.yaml of its run folder)."""
    from sammix.models.baselines import ALL_LABELED, BaselineRunConfig, NnUNetRunConfig, default_net

    m = METHODS[cell.method]
    train = replace(spec.train, labeled=cell.k if cell.k is not None else ALL_LABELED,
                    seed=cell.seed if cell.seed is not None else 0)
    if m.family == "nnunet":
        return NnUNetRunConfig(prep=spec.prep, train=train, data=list(spec.train_data), trainer=spec.nnunet_trainer)
    if m.family == "net":
        arch = "swinunetr" if cell.method.startswith("swinunetr") else "unet"
        net = spec.nets.get(arch) or default_net(arch)
        return BaselineRunConfig(prep=spec.prep, net=net, train=train, data=list(spec.train_data))
    if not m.trained:
        train = replace(train, epochs=0)
    model = spec.model if cell.method == "sammix" else replace(spec.model, prompt="full_box")
    cls_only = list(spec.cls_only_data) if cell.method == "sammix" else []
    return RunConfig(prep=spec.prep, model=model, train=train, data=list(spec.train_data), cls_only_data=cls_only)


def config_diff(run: Path, cfg) -> list[str]:
    """How the run folder's config.yaml differs from `cfg` ("model.lora_rank: 8 -> 4"); [] when it
    is the same or there is none yet."""
    path = RunFolder(run).config
    if not path.is_file():
        return []
    try:
        saved = dataclasses.asdict(type(cfg).load(path))
    except Exception as exc:
        return [f"config.yaml unreadable as {type(cfg).__name__} ({type(exc).__name__})"]
    diffs: list[str] = []

    def walk(a: dict, b: dict, prefix: str) -> None:
        for key in list(dict.fromkeys([*a, *b])):
            va, vb = a.get(key), b.get(key)
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, f"{prefix}{key}.")
            elif va != vb:
                diffs.append(f"{prefix}{key}: {va!r} -> {vb!r}")

    walk(saved, dataclasses.asdict(cfg), "")
    return diffs


def _same_config(run: Path, cfg) -> bool:
    return RunFolder(run).config.is_file() and not config_diff(run, cfg)


def _last_epoch(run: Path) -> int:
    return max((row.get("epoch", 0) for row in RunFolder(run).log()), default=0)


def _weights_stamp(run: Path) -> str:
    from sammix.models.baselines import NNUNET_DONE

    best = run / "best.pt"
    if (run / NNUNET_DONE).is_file():
        return json.loads((run / NNUNET_DONE).read_text())["stamp"]
    if not best.is_file():
        return "untrained"
    st = best.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


class Grid:
    def __init__(self, spec: ExperimentSpec):
        self.spec = spec
        self.out = Path(spec.out)
        self.runs = self.out / "runs"
        self.cache = Path(spec.cache_dir) if spec.cache_dir else None
        self.log_path = self.out / "experiment.log"

    def log(self, text: str) -> None:
        from tqdm import tqdm

        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        with open(self.log_path, "a") as fh:
            fh.write(line + "\n")
        tqdm.write(line)

    # -- training ---------------------------------------------------------------------------
    def train_cell(self, cell: Cell, run: Path) -> str:
        """Train the cell's run folder; returns "trained", "reused" or "untrained"."""
        from sammix.models.baselines import NNUNET_DONE

        m, cfg = METHODS[cell.method], cell_config(self.spec, cell)
        diff = config_diff(run, cfg)
        if diff:  # never reuse or resume a run made with other settings
            shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
            raise SammixError(f"{run} was made with other settings ({shown}); use another --out, "
                              "or delete this run folder to redo the cell")
        if not m.trained:
            RunFolder(run).prepare(cfg)
            RunFolder(run).write_split(self.split, [])
            return "untrained"
        if m.family == "nnunet":
            finished = _same_config(run, cfg) and (run / NNUNET_DONE).is_file()
        else:
            finished = _same_config(run, cfg) and _last_epoch(run) >= cfg.train.epochs and RunFolder(run).best.is_file()
        if finished:
            return "reused"
        if self.spec.no_train:
            raise SammixError("not run (--no-train and no finished run)")
        if m.family == "nnunet":
            from sammix.training.baselines import train_nnunet

            train_nnunet(cfg, run, cache_dir=self.cache)
        elif m.family == "net":
            from sammix.training.baselines import train_baseline

            train_baseline(cfg, run, cache_dir=self.cache)
        else:
            from sammix.training.train import train

            train(cfg, run, cache_dir=self.cache)
        saved = RunFolder(run).split()
        if sorted(saved["test"]) != sorted(self.split["test"]):
            raise SammixError(f"{run}: its test cases differ from the experiment's split")
        return "trained"

    # -- evaluation -------------------------------------------------------------------------
    def load_model(self, cell: Cell, run: Path):
        from sammix.models.baselines import NnUNetModel, SegNet
        from sammix.config import resolve_device
        from sammix.models.sammix import SamMix

        m = METHODS[cell.method]
        device = self.spec.train.device
        if m.family == "net":
            return SegNet.load(run, device)
        if m.family == "nnunet":
            return NnUNetModel(run, device)
        if m.trained:
            return SamMix.load(run, device)
        cfg = RunConfig.load(RunFolder(run).config)
        return SamMix(cfg.model, cfg.prep).to(resolve_device(device)).eval()

    def predict(self, model, cell: Cell, ts: TestSet) -> dict:
        """Predictions for ts.idx: masks, present, boxes, cams (numpy). SAM-Mix predicts each case
        as one scan, as `evaluate` does (`evaluate.predict_all`); the other methods slice by slice.
        The oracle gets each slice's ground-truth box and skips organ-free slices (it knows there
        is nothing)."""
        import torch
        from tqdm import tqdm

        from sammix.masks import mask_to_box

        n, s = len(ts.idx), self.spec.prep.size
        if cell.method == "sammix":  # as `evaluate` scores a run: each case one scan, with the level check
            from sammix.evaluation.evaluate import predict_all
            from sammix.models.inferer import SliceInferer

            pred = predict_all(model, ts.slices, ts.idx, desc=f"{cell.name} on {ts.name}")
            x = torch.from_numpy(ts.slices.images[ts.idx[ts.qual]].astype(np.float32) / 255.0).unsqueeze(1)
            cams = SliceInferer(model.eval()).gate(x, gate=False)[2]
            return {"masks": pred["masks"], "present": pred["present"], "boxes": pred["boxes"],
                    "qual_cams": cams.numpy().astype(np.float32)}
        out = {"masks": np.zeros((n, s, s), bool), "present": np.zeros(n, bool),
               "boxes": np.full((n, 4), np.nan, np.float32)}
        cams = np.zeros((len(ts.qual), s, s), np.float32)  # kept for the figures only
        oracle = cell.method == "sam-oracle"
        todo = np.flatnonzero(ts.present()) if oracle else np.arange(n)
        # nnU-Net predicts from files: one command for all slices
        bs = max(1, len(todo)) if METHODS[cell.method].family == "nnunet" else self.spec.eval_batch_size
        for start in tqdm(range(0, len(todo), bs), desc=f"{cell.name} on {ts.name}", unit="batch", leave=False):
            pos = todo[start:start + bs]
            idx = ts.idx[pos]
            x = torch.from_numpy(ts.slices.images[idx].astype(np.float32) / 255.0).unsqueeze(1)
            if oracle:
                boxes = torch.from_numpy(np.stack([mask_to_box(ts.slices.masks[i] > 0) for i in idx]))
                pred = model.predict_slices(x, boxes=boxes)
            else:
                pred = model.predict_slices(x)
            for key in out:
                out[key][pos] = pred[key].numpy()
            for j, p in enumerate(pos):
                cams[ts.qual == p] = pred["cams"][j].numpy()
        out["qual_cams"] = cams
        return out

    def evaluate_cell(self, cell: Cell, run: Path, ts: TestSet, model_box: list) -> tuple[dict, bool]:
        """Score one cell on one test set (or reuse the stored scores); returns (result, reused)."""
        from sammix.evaluation.evaluate import score_predictions
        from sammix.inference.geometry import clean_mask

        path = run / "eval" / f"{ts.name}.json"
        key = json.loads(json.dumps({
            "weights": _weights_stamp(run), "data": [str(Path(p).resolve()) for p in ts.paths],
            "prep": dataclasses.asdict(self.spec.prep), "n_slices": len(ts.idx),
            "slices": [f"{ts.slices.case[i]}/{int(ts.slices.slice_index[i])}" for i in ts.idx[ts.qual]],
            "cleanup": "holes",  # scores stored before the clean-up are redone
            "scan": "case, level check, one run" if cell.method == "sammix" else None,  # what SAM-Mix's scores went through
        }))
        if path.is_file() and (run / "eval" / f"{ts.name}.npz").is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return saved, True
        if not model_box:
            model_box.append(self.load_model(cell, run))
        start = time.time()
        pred = self.predict(model_box[0], cell, ts)
        pred["masks"] = clean_mask(pred["masks"])  # what `predict` writes and `evaluate` scores
        metrics = score_predictions(ts.slices, ts.idx, pred)
        seconds = time.time() - start  # prediction and scoring
        per_slice = metrics.pop("per_slice")
        result = {"key": key, "cell": cell.name, "test_set": ts.name, "domain": ts.domain,
                  "seconds": round(seconds, 2), "summary": metrics, "per_slice": per_slice}
        if cell.method == "sammix":  # where the Dice goes (evaluate --diagnose)
            from sammix.evaluation.diagnose import diagnose

            diagnosis = diagnose(model_box[0], ts.slices, ts.idx, pred, run / "eval" / f"{ts.name}_failures.png",
                                 cleanup=True)
            result["diagnosis"] = {k: v for k, v in diagnosis.items() if k != "per_slice"}
        from sammix.data.io import atomic_path

        with atomic_path(run / "eval" / f"{ts.name}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, masks=np.packbits(pred["masks"].reshape(len(ts.idx), -1), axis=1),
                                    shape=np.array(pred["masks"].shape), present=pred["present"],
                                    boxes=pred["boxes"], qual=ts.qual,
                                    qual_cams=pred["qual_cams"].astype(np.float16))
        write_json(result, path)
        return result, False

    # -- one cell ---------------------------------------------------------------------------
    def run_cell(self, cell: Cell, test_sets: list[TestSet]) -> dict:
        run = self.runs / cell.name
        status_path = run / "cell.json"
        previous = json.loads(status_path.read_text()) if status_path.is_file() else {}
        status = {"cell": cell.name, "method": cell.method, "k": cell.k, "seed": cell.seed, "status": "running"}
        try:
            start = time.time()
            trained = self.train_cell(cell, run)
            if trained == "trained":
                status["train_seconds"] = round(time.time() - start, 1)
                self.log(f"{cell.name}: trained in {status['train_seconds']:.0f} s")
            else:
                status["train_seconds"] = previous.get("train_seconds", 0.0) if trained == "reused" else 0.0
                if trained == "reused":
                    self.log(f"{cell.name}: reused finished run (epoch {_last_epoch(run)}), no training")
            status["training"] = trained
            status["eval_seconds"], status["n_eval_slices"] = {}, {}
            model_box: list = []
            for ts in test_sets:
                result, reused = self.evaluate_cell(cell, run, ts, model_box)
                status["eval_seconds"][ts.name] = result["seconds"]
                status["n_eval_slices"][ts.name] = len(ts.idx)
                s = result["summary"]
                self.log(f"{cell.name} on {ts.name}: {'reused ' if reused else ''}Dice "
                         f"{s.get('dice_mean', float('nan')):.3f}, HD {s.get('hd_mean', float('nan')):.1f} px "
                         f"({s['n_slices']} slices, {result['seconds']:.0f} s)")
            status["status"] = "done"
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one failed cell must not stop the grid
            status["status"] = "failed"
            status["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            run.mkdir(parents=True, exist_ok=True)
            (run / "error.txt").write_text(traceback.format_exc())
            self.log(f"{cell.name}: FAILED: {status['error']} (traceback in {run / 'error.txt'})")
        status["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        run.mkdir(parents=True, exist_ok=True)
        write_json(status, status_path)
        return status

    # -- everything -------------------------------------------------------------------------
    def run(self) -> dict:
        import torch
        from tqdm import tqdm

        from sammix import __version__

        started = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        cells = self.spec.cells()
        if not cells:
            raise SammixError("the grid is empty: no method to run")
        mine = self.spec.my_cells()
        test_sets, self.split = load_test_sets(self.spec)
        asked = dataclasses.asdict(self.spec)
        record = "experiment.json" if self.spec.num_parts == 1 else \
            f"experiment-part{self.spec.part_id}of{self.spec.num_parts}.json"
        write_json({
            "command": self.spec.command, "spec": asked, "cells": [c.name for c in cells],
            "split": self.split,
            "test_sets": {ts.name: {"domain": ts.domain, "paths": ts.paths, "n_slices": len(ts.idx),
                                    "n_cases": len(set(ts.slices.case[ts.idx]))} for ts in test_sets},
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sammix": __version__, "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        }, self.out / record)
        self.log(f"experiment: {len(mine)} of {len(cells)} cells, test sets "
                 + ", ".join(f"{ts.name} ({ts.domain}, {len(ts.idx)} slices)" for ts in test_sets))
        if self.spec.jobs > 1:
            statuses = self.run_parallel(mine)
        else:
            statuses = []
            bar = tqdm(mine, desc="experiment", unit="cell", disable=not mine)
            for cell in bar:
                bar.set_postfix_str(cell.name)
                statuses.append(self.run_cell(cell, test_sets))
            bar.close()
        wall = time.time() - started
        if self.spec.num_parts > 1 and not self.spec.report_only:  # the parts are merged by --report-only
            failed = [s["cell"] for s in statuses if s["status"] != "done"]
            self.log(f"experiment part {self.spec.part_id} of {self.spec.num_parts}: done in {wall:.0f} s, "
                     f"{len(mine) - len(failed)} cells ok, {len(failed)} failed")
            return {"report": None, "n_cells": len(mine), "failed": failed, "statuses": statuses,
                    "wall_seconds": wall}
        if self.spec.report_only:
            statuses = [self.finished_status(cell) for cell in cells]
        report = write_report(self.spec, cells, statuses, test_sets, self.out, wall_seconds=wall)
        failed = [s["cell"] for s in statuses if s["status"] != "done"]
        self.log(f"experiment: done in {wall:.0f} s, {len(cells) - len(failed)} cells ok, {len(failed)} failed; {report}")
        return {"report": str(report), "n_cells": len(cells), "failed": failed, "statuses": statuses,
                "wall_seconds": wall}

    def finished_status(self, cell: Cell) -> dict:
        """What an earlier run (a part, or the whole grid) recorded for `cell` in its cell.json."""
        path = self.runs / cell.name / "cell.json"
        if path.is_file():
            return json.loads(path.read_text())
        return {"cell": cell.name, "method": cell.method, "k": cell.k, "seed": cell.seed, "status": "failed",
                "error": "not run (no part has finished this cell)"}


    def run_parallel(self, cells: list[Cell]) -> list[dict]:
        """Cells in `spec.jobs` worker processes, the CPU threads shared out among them. The
        slice caches exist already (load_test_sets made them), so workers only read them."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        from tqdm import tqdm

        threads = max(1, (os.cpu_count() or 1) // self.spec.jobs)
        statuses: dict[str, dict] = {}
        with ProcessPoolExecutor(self.spec.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads, self.spec, self.split)) as pool:
            # the slowest cells (trained SAM) first, so the grid's end is not one long cell alone
            first = sorted(cells, key=lambda c: (not METHODS[c.method].trained, METHODS[c.method].family != "sam"))
            futures = {pool.submit(_run_cell_in_worker, cell): cell for cell in first}
            for future in tqdm(as_completed(futures), total=len(futures), desc="experiment", unit="cell"):
                cell = futures[future]
                try:
                    statuses[cell.name] = future.result()
                except Exception as exc:  # the worker itself died (run_cell catches the cell's own errors)
                    statuses[cell.name] = {"cell": cell.name, "method": cell.method, "k": cell.k, "seed": cell.seed,
                                           "status": "failed", "error": f"worker: {type(exc).__name__}: {exc}"}
                    self.log(f"{cell.name}: FAILED: {statuses[cell.name]['error']}")
        return [statuses[c.name] for c in cells]


_WORKER: dict = {}  # in each worker process: its Grid and test sets, loaded once


def _worker_init(threads: int, spec: ExperimentSpec, split: dict) -> None:
    import torch

    torch.set_num_threads(threads)
    grid = Grid(spec)
    test_sets, grid.split = load_test_sets(spec)
    if grid.split != split:
        raise SammixError("a worker found another case split than the experiment's")
    _WORKER.update(grid=grid, test_sets=test_sets)


def _run_cell_in_worker(cell: Cell) -> dict:
    return _WORKER["grid"].run_cell(cell, _WORKER["test_sets"])


def run_grid(spec: ExperimentSpec) -> dict:
    """Run (or complete) the grid of `spec` and write its report; returns a summary dict with
    `failed` (cell names), `statuses` (one per cell), `report` (path)."""
    return Grid(spec).run()
