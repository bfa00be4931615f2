"""What a training run writes as it goes: metrics.jsonl rows (the record) mirrored to TensorBoard."""

from __future__ import annotations

import math
import shutil
from typing import Any

from lightcrl.rundir import RunDir

__all__ = ["RunLog"]


class RunLog:
    """metrics.jsonl + TensorBoard of one run; only the main rank writes (``enabled``)."""

    def __init__(self, run: RunDir, tensorboard: bool = True, enabled: bool = True) -> None:
        self.run, self.tensorboard, self.enabled = run, tensorboard, enabled
        self._writer = None

    def start_fresh(self) -> None:
        """No checkpoint to resume: rows and events of a run killed before its first checkpoint go."""
        if self.enabled:
            self.run.metrics.unlink(missing_ok=True)
            shutil.rmtree(self.run.tensorboard, ignore_errors=True)

    def rewind(self, step: int) -> None:
        """Resumed at ``step``: drop the rows logged after it (they are about to be logged again)."""
        if self.enabled:
            self.run.truncate_metrics(step)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.run.append_metrics(row)
        if not self.tensorboard:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run.tensorboard))
        for k, v in row.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                self._writer.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
