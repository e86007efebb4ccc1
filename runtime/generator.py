"""The generation loop, the same code for every Session: prefill, then decode with the KV cache.

Prompts of different lengths run as one batch: right-padded in prefill, with each row's real
length passed along (packed plugin-form graphs compute no padding; native graphs do, and their
padding writes stale cache slots past each sequence's length, which the position-based mask never
shows and decode overwrites), then every sequence decodes at its own position. A sequence stops at one of
the EOS ids or after max_new_tokens; once one stops, the session drops its row (`Session.keep`:
its KV cache rows, or its paged blocks), so decode steps compute only the sequences still running.
The batch stops when all have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from trtc.errors import TrtcError

from .sampler import Sampler, SamplingParams
from .session import Session


@dataclass
class Sequence:
    prompt_ids: list[int]
    generated: list[int]
    finish_reason: str | None = None   # "stop" (EOS), "length" (max_new_tokens or cache full)


def generate_ids(session: Session, prompts: list[list[int]], *, max_new_tokens: int,
                 params: SamplingParams, eos_ids: tuple[int, ...], max_input_len: int,
                 max_seq_len: int, on_token: Callable[[int, int], None] | None = None) -> list[Sequence]:
    """Generate for one batch (len(prompts) <= the engine's max batch size)."""
    if max_new_tokens < 1:
        raise TrtcError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    for i, p in enumerate(prompts):
        if not p:
            raise TrtcError(f"prompt {i} is empty after tokenization; give some text")
        if len(p) > max_input_len:
            raise TrtcError(f"prompt {i} is {len(p)} tokens, longer than the engine's max-input-len "
                            f"{max_input_len}; shorten it or rebuild with --max-input-len {len(p)}")
    B = len(prompts)
    lens = np.array([len(p) for p in prompts], dtype=np.int64)
    S = int(lens.max())
    ids = np.zeros((B, S), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    pos = np.broadcast_to(np.arange(S, dtype=np.int64), (B, S))
    seqs = [Sequence(list(p), []) for p in prompts]
    sampler = Sampler(params)
    eos = set(eos_ids)

    session.allocate(B)
    logits = session.step(ids, pos, lens)
    last = logits[np.arange(B), lens - 1]
    cur = lens.copy()               # next position (= tokens in cache) per row of the session's batch
    rows = list(range(B))           # row r of the session's batch is sequence rows[r]
    while True:
        tokens = sampler(last)
        for r, i in enumerate(rows):
            s, t = seqs[i], int(tokens[r])
            s.generated.append(t)
            if on_token is not None:
                on_token(i, t)
            if t in eos:
                s.finish_reason = "stop"
            elif len(s.generated) >= max_new_tokens or cur[r] >= max_seq_len:
                # cur[r] is the cache slot this token would take in the next step
                s.finish_reason = "length"
        running = [r for r, i in enumerate(rows) if seqs[i].finish_reason is None]
        if not running:
            return seqs
        if len(running) < len(rows):
            session.keep(running)
            rows, tokens, cur = [rows[r] for r in running], tokens[running], cur[running]
        logits = session.step(tokens[:, None], cur[:, None])
        last = logits[:, 0]
        cur = cur + 1
