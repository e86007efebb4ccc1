"""runtime/launcher.py's pure logic, on CPU: rank -> GPU and engine, world-size checks before
anything loads, the rendezvous environment, the set-up order, rank engine checksums. The launcher
itself (processes, NCCL, TensorRT) is unverified: no GPU with TensorRT here (README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from factories import pass_test_spec
from trtc import artifact as art
from trtc.errors import TrtcError, TrtcInternalError
from trtc.runtime import launcher
from trtc.runtime.engine_dir import EngineDir


def engine_dir(path: Path, world: int = 2, targets=(("sm_89",), ("sm_90",)), write: bool = False) -> EngineDir:
    """An engine dir record of `world` ranks with one engine per rank and target."""
    engines = [art.EngineFile(r, list(t), art.rank_engine(r, t[0])) for r in range(world) for t in targets]
    files = {}
    if write:
        path.mkdir(parents=True, exist_ok=True)
        for e in engines:
            (path / e.file).write_bytes(f"plan of rank {e.rank}".encode())
        files = art.file_table(path, [e.file for e in engines])
    spec = pass_test_spec(num_heads=4, num_kv_heads=2)
    cfg = art.EngineConfig(
        format_version=art.FORMAT_VERSION, trtc_version="test", pretrained_config=spec,
        export_config=art.ExportConfig(dtype="float16", max_seq_len=64), mapping=art.Mapping(world, world),
        quantization={"quant_algo": None, "kv_cache_quant_algo": None}, io=art.IOTable(), onnx=[],
        tokenizer_files=[], source=art.Source(model="m"), passes={}, files=files, fingerprint="abcd" * 4,
        build_config=art.BuildConfig(max_batch_size=2, max_input_len=8, max_seq_len=64,
                                     targets=tuple(t[0] for t in targets), engine_per_target=True),
        profiles=[], tensorrt=art.TensorRTInfo("tensorrt", "10.16.0", [t[0] for t in targets], True), engines=engines)
    return EngineDir(path, cfg)


def test_each_rank_gets_its_own_gpu_and_its_engine_for_that_gpu(tmp_path):
    ed = engine_dir(tmp_path, world=2)
    launches = launcher.plan_launch(ed, [90, 89, 89], port=29500)     # a third GPU is left alone
    assert [(x.rank, x.device, x.engine) for x in launches] == [(0, 0, "rank0.sm_90.engine"),
                                                                (1, 1, "rank1.sm_89.engine")]
    assert launches[1].env == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "1",
                               "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert set(launches[0].env) == set(launcher.RANK_ENV)


def test_fewer_gpus_than_ranks_is_one_error_before_anything_loads(tmp_path):
    ed = engine_dir(tmp_path / "nowhere", world=4)          # no file exists: nothing is read
    for sms in ([], [90, 90, 90]):
        with pytest.raises(TrtcError) as e:
            launcher.plan_launch(ed, sms, port=1)
        assert f"has 4 ranks (tp 4), each needing its own GPU, but {len(sms)} GPU" in str(e.value)
        assert "--backend onnxruntime" in str(e.value)


def test_a_gpu_without_an_engine_of_its_rank(tmp_path):
    ed = engine_dir(tmp_path, world=2, targets=(("sm_90",),))
    with pytest.raises(TrtcError, match="no rank 1 engine for GPU 1 \\(sm_89\\).*--target sm_89"):
        launcher.plan_launch(ed, [90, 89], port=1)


def test_setup_order_respects_what_each_step_needs():
    launcher.check_setup_order()
    names = [n for n, _ in launcher.SETUP]
    assert names.index("select_device") < names.index("init_process_group") < names.index("set_communicator")
    assert names.index("create_contexts") < names.index("set_communicator")
    swapped = tuple(s for s in launcher.SETUP if s[0] != "select_device") + (launcher.SETUP[0],)
    with pytest.raises(TrtcInternalError, match="init_process_group runs before select_device"):
        launcher.check_setup_order(swapped)

    class Recorder:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return lambda: self.calls.append(name)

    rec = Recorder()
    launcher.run_setup(rec)
    assert rec.calls == names


def test_rank_engines_are_verified_by_rank_before_any_process_starts(tmp_path):
    ed = engine_dir(tmp_path, world=2, targets=(("sm_90",),), write=True)
    launches = launcher.plan_launch(ed, [90, 90], port=1)
    launcher.verify_rank_engines(ed, launches)
    (tmp_path / "rank1.sm_90.engine").write_bytes(b"plan of rank 9")      # same size, another build's
    with pytest.raises(TrtcError) as e:
        launcher.verify_rank_engines(ed, launches)
    assert str(e.value).startswith("rank 1: ") and "another build cannot be mixed in" in str(e.value)


def test_rank_view_has_the_rank_head_counts(tmp_path):
    view = launcher.rank_view(engine_dir(tmp_path, world=2))
    assert (view.spec.num_heads, view.spec.num_kv_heads, view.spec.intermediate_size) == (2, 1, 32)
