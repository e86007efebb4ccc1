"""Sampling on host logits: greedy at temperature 0, else temperature / top-k / top-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trtc.errors import TrtcError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0     # 0 = greedy (argmax)
    top_k: int = 0               # 0 = no top-k cut
    top_p: float = 1.0           # 1 = no nucleus cut
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise TrtcError(f"--temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise TrtcError(f"--top-k {self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise TrtcError(f"--top-p {self.top_p} must be in (0, 1]")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, V] float -> token ids [B] int64."""
        p = self.params
        if p.temperature == 0.0:
            return logits.argmax(axis=-1).astype(np.int64)
        x = logits.astype(np.float64) / p.temperature
        if p.top_k > 0 and p.top_k < x.shape[-1]:
            kth = np.partition(x, -p.top_k, axis=-1)[:, -p.top_k][:, None]
            x = np.where(x < kth, -np.inf, x)
        x = x - x.max(axis=-1, keepdims=True)
        probs = np.exp(x)
        probs /= probs.sum(axis=-1, keepdims=True)
        if p.top_p < 1.0:
            order = np.argsort(-probs, axis=-1)
            sorted_p = np.take_along_axis(probs, order, axis=-1)
            cum = np.cumsum(sorted_p, axis=-1)
            keep_sorted = (cum - sorted_p) < p.top_p          # always keeps the top token
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, axis=-1)
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum(axis=-1, keepdims=True)
        return np.array([self.rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)
