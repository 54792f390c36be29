"""Run every benchmark in bench/ (each prints JSON lines); `make bench` calls this."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = [
    "ami_ingest.py",
    "cycle.py",
    "execute.py",
    "retention.py",
    "kamailio_failover.py",
    "dashboard.py",
    "detect.py",
]


def main() -> int:
    here = Path(__file__).parent
    failed = 0
    for name in BENCHES:
        print(f"# {name}", file=sys.stderr, flush=True)
        failed += subprocess.call([sys.executable, str(here / name)]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
