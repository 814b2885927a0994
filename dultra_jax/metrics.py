"""Training metrics: `metrics.jsonl` (one JSON object per logged step) and TensorBoard scalars,
written by process 0, plus the means of a window of steps."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np


class MetricsWriter:
    """`metrics.jsonl` and TensorBoard scalars under `workdir`; only process 0 writes."""

    def __init__(self, workdir: str, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard = None
        if not self.enabled:
            return
        # Rows written after the checkpoint we resume from are replaced by the rerun of those steps.
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
        from tensorboardX import SummaryWriter  # optional heavy dependency, only on the writing process

        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, row["step"])
        self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def mean_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """The mean of each scalar over a window of steps' metrics (device scalars are fetched, which
    waits for those steps); `skipped` (a non-finite update) is counted instead."""
    host = jax.device_get(list(rows))
    out: dict[str, float | int] = {k: float(np.mean([np.asarray(r[k], np.float64) for r in host]))
                                   for k in host[0] if k != "skipped"}
    out["skipped"] = int(sum(int(np.asarray(r["skipped"])) for r in host))
    return out
