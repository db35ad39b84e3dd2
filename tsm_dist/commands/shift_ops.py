"""Build or check the temporal shift's C++ ops (:mod:`tsm_dist.models.shift_native`); ./install.sh builds them.

    python -m tsm_dist.commands.shift_ops build    # compile unless built; one line; exit 1 if not built
    python -m tsm_dist.commands.shift_ops status   # C++ or Python, and why; exit 1 when Python
"""
from __future__ import annotations

import argparse
import sys

from tsm_dist.models import shift_native


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build or check the temporal shift's C++ ops")
    parser.add_argument("what", choices=["build", "status"])
    args = parser.parse_args(argv)
    if args.what == "build":
        try:
            path = shift_native.build()
        except RuntimeError as exc:
            print(f"shift ops: not built, the Python kernels will run: {exc}", file=sys.stderr)
            return 1
        print(f"shift ops: built {path}" if shift_native.available() else shift_native.summary())
        return 0 if shift_native.available() else 1
    print(shift_native.summary())
    return 0 if shift_native.available() else 1


if __name__ == "__main__":
    raise SystemExit(main())
