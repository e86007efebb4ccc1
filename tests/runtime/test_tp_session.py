"""runtime/tp_session.py pieces: the in-process all-reduce and the load-time rewrite of the
graphs' DistCollective nodes. (Whole tensor-parallel dirs: tests/test_tp_end_to_end.py.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from trtc.errors import TrtcError
from trtc.runtime.tp_session import DOMAIN, OP, RankGroup, rewrite_collectives


def run_threads(fn, n: int) -> list:
    out: list = [None] * n
    errors: list = []

    def body(r):
        try:
            out[r] = fn(r)
        except Exception as e:       # noqa: BLE001  (checked by the test)
            errors.append(e)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a rank is stuck"
    return out if not errors else errors


def test_all_reduce_gives_every_rank_the_same_sum_in_rank_order():
    group = RankGroup(4, timeout=10)
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((3, 5)).astype(np.float32) * 10 ** r for r in range(4)]
    for _ in range(3):                   # the group is reused call after call
        sums = run_threads(lambda r: group.all_reduce(r, parts[r]), 4)
        ref = ((parts[0] + parts[1]) + parts[2]) + parts[3]
        for s in sums:
            assert s.dtype == np.float32
            np.testing.assert_array_equal(s, ref)       # bit-identical on every rank
    group.close()


def test_a_failed_rank_releases_the_others():
    group = RankGroup(3, timeout=30)

    def rank(r):
        if r == 2:
            group.abort()                # what OnnxRuntimeTPSession does when a rank's run fails
            raise RuntimeError("rank 2 failed")
        return group.all_reduce(r, np.ones(2, np.float32))

    errors = run_threads(rank, 3)
    assert len(errors) == 3 and {type(e).__name__ for e in errors} == {"RuntimeError", "BrokenBarrierError"}


def _model(op_attrs: dict, dtype):
    from onnx import TensorProto, helper

    node = helper.make_node("DistCollective", ["x"], ["y"], name="o_allreduce", **op_attrs)
    t = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", t, [2])],
                          [helper.make_tensor_value_info("y", t, [2])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)])


ALL_REDUCE = {"collective_operation": "all_reduce", "reduce_op": "sum", "root": -1, "group_size": 0, "nb_rank": 2}


def test_rewrite_float16_wraps_the_sum_in_casts():
    m = _model(ALL_REDUCE, "float16")
    assert rewrite_collectives(m, rank=1, group=7, float16=True) == 1
    ops = [(n.op_type, n.domain) for n in m.graph.node]
    assert ops == [("Cast", ""), (OP, DOMAIN), ("Cast", "")]
    attrs = {a.name: a.i for a in m.graph.node[1].attribute}
    assert attrs == {"rank": 1, "group": 7}
    assert m.graph.node[-1].output[0] == "y"
    assert any(o.domain == DOMAIN for o in m.opset_import)


def test_rewrite_refuses_what_it_cannot_execute():
    with pytest.raises(TrtcError, match="all_gather"):
        rewrite_collectives(_model(dict(ALL_REDUCE, collective_operation="all_gather"), "float32"), 0, 1, False)
