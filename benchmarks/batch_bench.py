"""Batch prediction throughput: N CTs through `sammix predict` as one process, and as 2 parts
(`--num-parts 2`) side by side, measured in the same run on the same inputs.

    .venv/bin/python benchmarks/batch_bench.py --run RUN [--copies 4] [--precision int8]

The inputs are copies (symlinks) of the shared CTs (TotalSegmentator, LiTS 117, CHAOS DICOM),
`--copies` of each. Prints CTs per minute (wall, process start and model load included) and the
peak resident memory of each process (/usr/bin/time's maximum RSS).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
INPUTS = [SHARED / "totalseg-example" / "ct.nii.gz", SHARED / "lits-117" / "volume-117.nii.gz",
          SHARED / "chaos-ct3" / "dicom"]


def _command(args, inputs: Path, out: Path, part: int | None = None) -> list[str]:
    cmd = ["/usr/bin/time", "-v", str(Path(sys.executable).with_name("sammix")), "predict", "--run", str(args.run),
           str(inputs), "-o", str(out), "--precision", args.precision]
    if part is not None:
        cmd += ["--num-parts", "2", "--part-id", str(part)]
    return cmd


def _peak_mb(stderr: str) -> float:
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(found.group(1)) / 1024 if found else float("nan")


def _run(commands: list[list[str]], threads: int) -> tuple[float, list[float]]:
    env = {"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for c in commands]
    errs = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - start
    for p, err in zip(procs, errs):
        if p.returncode != 0:
            raise SystemExit(f"predict failed ({p.returncode}): {err.strip().splitlines()[-1]}")
    return wall, [_peak_mb(e) for e in errs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--precision", default="int8", choices=["auto", "fp32", "int8"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for copy in range(args.copies):
            for path in INPUTS:
                (folder / f"{copy}-{path.name}").symlink_to(path)
        n = args.copies * len(INPUTS)
        _run([_command(args, folder, Path(tmp) / "warm", 0)], 2)  # the export cache and the page cache, once
        one, one_mem = _run([_command(args, folder, Path(tmp) / "one")], 2)
        two, two_mem = _run([_command(args, folder, Path(tmp) / "two", part) for part in (0, 1)], 1)
    print(f"{n} CTs ({args.copies} x TotalSegmentator, LiTS 117, CHAOS), precision {args.precision}:")
    print(f"  1 process, 2 threads : {n / one * 60:5.1f} CTs/min ({one:.0f} s), peak {one_mem[0]:.0f} MB")
    print(f"  2 parts, 1 thread each: {n / two * 60:5.1f} CTs/min ({two:.0f} s), peak "
          + " / ".join(f"{m:.0f}" for m in two_mem) + " MB")


if __name__ == "__main__":
    main()
