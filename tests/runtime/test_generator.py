"""The generator drops finished sequences from the session's batch (Session.keep) instead of
computing them to the end, and the survivors' tokens are unchanged by it."""

from __future__ import annotations

import pytest

from factories import PROMPTS, TINY_MAX_SEQ


class _Recording:
    """The real session, with the batch size of every step written down."""

    def __init__(self, session):
        self.inner, self.batches = session, []
        self.backend = session.backend

    def allocate(self, batch):
        self.inner.allocate(batch)

    def keep(self, rows):
        self.inner.keep(rows)

    def step(self, ids, pos, lengths=None):
        self.batches.append(ids.shape[0])
        return self.inner.step(ids, pos, lengths)


@pytest.mark.parametrize("family", ["llama"])
def test_finished_sequences_leave_the_batch(family, tiny_engine):
    from trtc.runtime import LLM
    from trtc.runtime.generator import generate_ids
    from trtc.runtime.sampler import SamplingParams

    llm = LLM(tiny_engine(family), backend="onnxruntime")
    prompts = [llm.encode(p) for p in PROMPTS]
    lens = sorted(len(p) for p in prompts)
    assert len(set(lens)) == len(lens)             # each prompt fills the cache at a different step
    rec = _Recording(llm.session)
    kw = dict(max_new_tokens=TINY_MAX_SEQ, params=SamplingParams(), eos_ids=(), max_input_len=48,
              max_seq_len=TINY_MAX_SEQ)
    together = generate_ids(rec, prompts, **kw)
    # prefill with 4, then the batch shrinks as each sequence reaches max_seq_len
    assert rec.batches[0] == 4 and rec.batches[-1] == 1
    assert sorted(set(rec.batches), reverse=True) == [4, 3, 2, 1]
    assert sum(rec.batches[1:]) == sum(TINY_MAX_SEQ - n for n in lens)   # each row decodes until its cache is full
    for p, s in zip(prompts, together):
        alone = generate_ids(llm.session, [p], **kw)[0]
        assert s.generated == alone.generated and s.finish_reason == alone.finish_reason == "length"
        assert len(p) + len(s.generated) == TINY_MAX_SEQ + 1
