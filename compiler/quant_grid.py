"""The quantization grid and format limits: no numpy or torch, so option checks stay fast."""

from __future__ import annotations

from dataclasses import dataclass

FP8_MAX, INT8_MAX = 448.0, 127.0


@dataclass(frozen=True)
class Grid:
    """Quantization grid for rows [k, N]: one scale (and offset) per column over `group`
    consecutive rows (group 0: over all rows).
      kind 'int', qmin < 0: symmetric integers qmin..qmax, w ~ s * q.
      kind 'int', qmin == 0: affine, w ~ s * u + lo with u in 0..qmax; `lo` (the group minimum) is
                             a float, not an integer zero point (TensorRT rejects non-zero zero
                             points), so the graph adds it back as a separate small MatMul.
      kind 'fp8': e4m3 values, w ~ s * e4m3."""
    kind: str
    qmin: int
    qmax: int
    group: int

    @property
    def affine(self) -> bool:
        return self.kind == "int" and self.qmin == 0
