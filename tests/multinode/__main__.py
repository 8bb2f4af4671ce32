"""``python -m tests.multinode SCENARIO WORKDIR``: run one scenario, write its result.json."""

from __future__ import annotations

import importlib
import os
import sys

import torch

from tests.multinode.cluster import write_result

SCENARIOS = ("etl", "train", "serve", "gpu")


def main() -> int:
    name, workdir = sys.argv[1], sys.argv[2]
    if name not in SCENARIOS:
        print(f"unknown scenario {name!r}; choose from {SCENARIOS}", file=sys.stderr)
        return 2
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.environ.setdefault("UNCLIP_SAMPLING_NUMERICS", "fp32")
    result = importlib.import_module(f"tests.multinode.{name}").run(workdir)
    write_result(workdir, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
