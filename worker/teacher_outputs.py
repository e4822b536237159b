"""The frozen teacher's outputs on the val split, computed at the first evaluation and reused.

The teacher never changes during a run and the val split is read in the same order every time,
so its logits are the same at every evaluation: keeping them turns every later evaluation into
a student-only pass. A split whose logits would exceed `TEACHER_OUTPUTS_MAX_BYTES` (an LM with a
large vocabulary, say) is not kept: each evaluation runs the teacher again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TEACHER_OUTPUTS_MAX_BYTES = 512 * 2**20


class TeacherOutputs:
    """Teacher outputs of the val batches, by batch index, held on `device`."""

    def __init__(self, device: torch.device, max_bytes: int = TEACHER_OUTPUTS_MAX_BYTES) -> None:
        self.device = device
        self.max_bytes = max_bytes
        self.forward_passes = 0  # val batches the teacher actually ran on
        self._kept: list[torch.Tensor] = []
        self._bytes = 0
        self._complete = False  # one whole pass is kept
        self._too_large = False

    def get(self, index: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The teacher's output for val batch `index`; `compute` runs it when not kept."""
        if self._complete:
            return self._kept[index]
        output = compute()
        self.forward_passes += 1
        if not self._too_large and index == len(self._kept):
            self._bytes += output.numel() * output.element_size()
            if self._bytes > self.max_bytes:
                self._too_large, self._kept = True, []
            else:
                self._kept.append(output.detach())
        return output

    def end_pass(self) -> None:
        """Called after a whole pass over the val split: what was kept is now complete."""
        if not self._too_large and self._kept:
            self._complete = True
