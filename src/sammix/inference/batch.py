"""The inputs of one `sammix predict` call as jobs: found, named, split into parts, checked for
being done (no model code here; `predict.predict_inputs` runs the jobs).

- Inputs are paths (folders are walked: `io.find_inputs`) and rows of manifest CSVs
  (`read_manifest`). Every input is one `Job`, sorted by input path; a bad input is a job with its
  one-line error, reported by the part it falls to.
- Output names are the input's (`output_stem`); inputs that share one are told apart by their
  parent folder, then by _2, _3, ...; a manifest may give a name.
- Scans: 2D images of one folder named `<case>_<slice>` are slices of one scan (`scans`), predicted
  together so the checks across a volume's slices see them all.
- Parts: scan i (a volume, an image, or one scan's images) belongs to part i mod P (`select_part`),
  so P processes given the same arguments cover every input exactly once.
- Done: OUT/<name>.json, the record, is written last and is the commit mark. An input is done when
  its record comes from the same run key (`run_key`: the run's files and the settings that change
  a mask) and input, and its outputs are there (`is_done`); anything else is redone.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sammix.runfolder import RunFolder
from sammix.data import io
from sammix.data.layouts import slice_name
from sammix.errors import InputError, SammixError, one_line

SUFFIXES = io.VOLUME_SUFFIXES + io.IMAGE2D_SUFFIXES


def summary_name(num_parts: int = 1, part_id: int = 0) -> str:
    """The file a call's summary goes to in the output folder."""
    return "predict-summary.json" if num_parts == 1 else f"predict-summary-part{part_id}of{num_parts}.json"


def _strip_suffix(name: str) -> str:
    return next((name[: -len(s)] for s in SUFFIXES if name.lower().endswith(s)), name)


def output_stem(path: Path) -> str:
    """ct.nii.gz -> ct; scan.nrrd -> scan; a DICOM folder -> its name."""
    return _strip_suffix(path.name) if path.is_file() else path.name


@dataclass
class Job:
    """One input: its output name, or why it cannot be done (one line naming the file)."""

    input: Path
    name: str | None = None
    error: str | None = None

    @property
    def scan(self) -> tuple[Path, str, int] | None:
        """(folder, case, slice index) of an image named `<case>_<slice>`; None otherwise."""
        if not self.is_image:
            return None
        case, index = slice_name(_strip_suffix(self.input.name))
        return None if index is None else (self.input.parent.resolve(), case, index)

    @property
    def is_image(self) -> bool:
        return self.input.is_file() and self.input.name.lower().endswith(io.IMAGE2D_SUFFIXES)

    def targets(self, out: Path) -> dict[str, Path]:
        """Its files in `out`: mask, record and (volumes) preview."""
        paths = {"mask": out / f"{self.name}{'.png' if self.is_image else '.nii.gz'}",
                 "record": out / f"{self.name}.json"}
        if not self.is_image:
            paths["preview"] = out / f"{self.name}_preview.png"
        return paths


def read_manifest(path) -> list[tuple[Path, str | None]]:
    """A CSV with rows `INPUT[,OUTPUT_NAME]` (a first row starting with `input` is a header; a
    relative INPUT is taken from the CSV's folder) -> (input, name or None) pairs."""
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            rows = [(n, [cell.strip() for cell in row]) for n, row in enumerate(csv.reader(fh), 1)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read the manifest ({one_line(exc)})") from None
    rows = [(n, row) for n, row in rows if any(row)]
    if rows and rows[0][1][0].lower() == "input":
        rows = rows[1:]
    pairs = []
    for n, row in rows:
        if len(row) > 2 or not row[0]:
            raise InputError(path, f"line {n}: expected INPUT[,OUTPUT_NAME], got {','.join(row)!r}")
        pairs.append((path.parent / row[0], row[1] if len(row) == 2 and row[1] else None))
    return pairs


def _expand(raw: Path, name: str | None, out: Path) -> list[Job]:
    """One command-line path or manifest row -> its jobs. Files inside the output folder are left
    out of folder searches, so a second run does not segment its own masks."""
    try:
        if raw.is_dir() and raw.resolve() == out:
            raise InputError(raw, "is also the output folder (-o); write the masks to another folder, "
                                  "or a later run would take them for inputs")
        paths = io.find_inputs([raw])
        if name is not None and len(paths) != 1:
            raise InputError(raw, f"an output name needs a single input; this folder holds {len(paths)}")
    except SammixError as exc:
        return [Job(raw, error=str(exc))]
    if raw.is_dir() and raw.resolve() in out.parents:
        paths = [p for p in paths if out not in p.resolve().parents]
    return [Job(p, name) for p in paths]


def _name_jobs(jobs: list[Job], reserved: set[str]) -> None:
    """Give every job its output name: the manifest's (used once, a plain file name) or its own."""
    taken = set(reserved)
    for job in jobs:
        if job.name is None or job.error is not None:
            continue
        name = _strip_suffix(job.name)
        if not name or name.startswith(".") or Path(name).name != name:
            job.error = str(InputError(job.input, f"output name {job.name!r} is not a plain file name"))
        elif name in taken:
            job.error = str(InputError(job.input, f"output name {name!r} is taken by another input"))
        else:
            job.name = name
            taken.add(name)
    auto = [job for job in jobs if job.name is None and job.error is None]
    stems = [output_stem(job.input) for job in auto]
    counts = Counter(stems)
    for job, stem in zip(auto, stems):
        base = f"{job.input.parent.name}_{stem}" if counts[stem] > 1 else stem
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        job.name = name
        taken.add(name)


def plan_jobs(inputs, manifests, out, num_parts: int = 1) -> list[Job]:
    """Paths and manifest CSVs -> every job of the call, sorted by input, named (the same in every
    part), those whose outputs would replace an input file failed."""
    out = Path(out).resolve()
    requests = [(Path(p), None) for p in inputs] + [pair for m in manifests for pair in read_manifest(m)]
    jobs: dict[Path, Job] = {}
    for raw, name in requests:
        for job in _expand(raw, name, out):
            jobs.setdefault(job.input.resolve(), job)
    ordered = sorted(jobs.values(), key=lambda job: str(job.input))
    _name_jobs(ordered, {summary_name(num_parts, i)[: -len(".json")] for i in range(num_parts)})
    input_files = {p for p, job in jobs.items() if job.error is None}
    input_files.update(f.resolve() for p in list(input_files) if p.is_dir() for f in p.iterdir())
    for job in ordered:
        clash = next((t for t in job.targets(out).values() if job.error is None and t in input_files), None)
        if clash is not None:
            job.error = str(InputError(job.input, f"its output {clash} would overwrite an input; "
                                                  "choose another --out folder"))
    return ordered


def scans(jobs: list[Job]) -> list[list[Job]]:
    """Jobs -> scans, in order: the images of one folder and case (`Job.scan`) together, sorted by
    slice, every other job alone. A case with two images of one slice number is not a scan:
    its images go alone."""
    groups: dict = {}
    for job in jobs:
        scan = job.scan if job.error is None else None  # resolved once: a path lookup each time
        groups.setdefault(id(job) if scan is None else scan[:2], []).append((scan, job))
    result = []
    for group in groups.values():
        slices = [scan[2] for scan, _ in group] if len(group) > 1 else []
        if len(set(slices)) < len(slices):
            result += [[job] for _, job in group]
        else:
            result.append([job for _, job in (sorted(group, key=lambda pair: pair[0][2]) if slices else group)])
    return result


def select_part(jobs: list, num_parts: int, part_id: int) -> list[list[Job]]:
    """Part `part_id` of `num_parts`: every num_parts-th scan (`scans`) from the part_id-th."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise SammixError(f"--part-id must be in 0..{num_parts - 1} and --num-parts at least 1, "
                          f"got --num-parts {num_parts} --part-id {part_id}")
    return scans(jobs)[part_id::num_parts]


def run_key(run, settings: dict) -> str | None:
    """sha256 of what makes a mask: the run folder's config and weights files and `settings`
    (window, clean-up, ...). None for a model given as an object: its outputs are always redone."""
    if not isinstance(run, (str, Path)):
        return None
    run = RunFolder(run).check()
    digest = hashlib.sha256()
    for name in (RunFolder.CONFIG, RunFolder.BEST):
        with open(run / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def is_done(job: Job, out: Path, key: str | None, preview: bool) -> bool:
    """The job's record is from this run key and input, and its mask (and preview, if asked) exist."""
    targets = job.targets(out)
    try:
        record = json.loads(targets["record"].read_text())
    except (OSError, ValueError):
        return False
    wanted = [targets["mask"]] + ([targets["preview"]] if preview and not job.is_image else [])
    return (key is not None and isinstance(record, dict) and record.get("run_key") == key
            and record.get("input") == str(job.input.resolve()) and all(p.is_file() for p in wanted))
