"""One line per run record of a study folder (used by gpu.sh for the smoke study's figures).

python benchmarks/gpu_records.py <study.dir>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(study: str) -> None:
    for p in sorted(Path(study).glob("runs/*/result.json")):
        r = json.loads(p.read_text())
        print(
            f"{r['experiment']:18s} {r['status']:14s} steps {r['steps_done']:4d} "
            f"wall {r.get('wall_seconds') or 0:6.1f}s tok/s {r.get('tokens_per_second') or 0:,.0f} "
            f"mfu {r.get('mfu') or 0:.3%} precision {r.get('precision')}"
        )


if __name__ == "__main__":
    main(sys.argv[1])
