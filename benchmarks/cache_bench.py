"""The slice cache: preparing a dataset the first time against reusing its cache (the second
`sammix prepare` / `train` on unchanged data must not read the volumes again).

    .venv/bin/python benchmarks/cache_bench.py [DATASET]   (default ../shared/data/lits-117)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from sammix.config import PrepConfig
from sammix.data.cache import prepare_dataset


def main() -> None:
    data = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / "../shared/data/lits-117")
    with tempfile.TemporaryDirectory() as cache:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            prepared = prepare_dataset(data, PrepConfig(), cache_dir=Path(cache), progress=False)
            times.append(time.perf_counter() - start)
        print(f"{data}: {len(prepared)} slices; first prepare {times[0]:.2f} s, reuse {times[1]:.3f} s "
              f"({times[0] / max(times[1], 1e-9):.0f}x)")


if __name__ == "__main__":
    main()
