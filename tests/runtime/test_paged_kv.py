"""The paged KV manager: blocks follow the tokens, tables list them in order, running out is an error."""

import numpy as np
import pytest

from trtc.errors import TrtcError
from trtc.runtime.paged_kv import PagedKVCache


def cache(**kw):
    return PagedKVCache(**{"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "block_size": 16, "max_seq_len": 40,
                           **kw})


def test_blocks_follow_tokens():
    kv = cache()
    kv.allocate(2)
    assert kv.max_blocks == 3 and kv.num_blocks == 6 and kv.pools[0].shape == (6, 2, 2, 16, 4)
    kv.reserve([5, 17])                      # 1 block, 2 blocks
    assert kv.tables == [[0], [1, 2]]
    kv.reserve([16, 17])                     # nothing new
    kv.reserve([17, 18])                     # row 0 crosses a block boundary
    assert kv.tables == [[0, 3], [1, 2]]
    bt = kv.block_tables()
    assert bt.dtype == np.int32 and bt.tolist() == [[0, 3, -1], [1, 2, -1]]
    kv.release(1)
    kv.reserve([17, 1])
    assert kv.tables[1] == [1]               # released blocks are reused first


def test_pool_exhausted_and_too_long():
    kv = cache()
    kv.allocate(2, num_blocks=2)
    kv.reserve([16, 16])
    with pytest.raises(TrtcError, match="exhausted"):
        kv.reserve([17, 16])
    with pytest.raises(TrtcError, match="max-seq-len"):
        cache().reserve([41])


def test_keep_drops_finished_sequences_and_frees_their_blocks():
    kv = cache()
    kv.allocate(3)
    kv.reserve([17, 5, 33])                  # [0, 1], [2], [3, 4, 5]
    kv.keep([2, 0])                          # sequence 1 finished; the rest in a new order
    assert kv.tables == [[3, 4, 5], [0, 1]] and kv.block_tables().shape == (2, 3)
    assert sorted(kv.free)[:1] == [2]        # its block is free again
    kv.reserve([34, 33])                     # row 1 needs a third block: the freed one comes first
    assert kv.tables[1] == [0, 1, 2]
