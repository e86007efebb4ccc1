"""OnnxRuntimeSession: runs the engine dir's kept rank graph on ONNX Runtime (CPU).

This is the reference backend: the same graph the engine was built from, so token-level
agreement with transformers proven here is agreement of the graph TensorRT compiled. The KV cache
lives in OrtValues bound as both the past input and the present output of each step, so
TensorScatter updates it in place instead of copying the whole cache every step.
"""

from __future__ import annotations

import numpy as np

from trtc import artifact as art
from trtc.errors import TrtcError

from .engine_dir import EngineDir

_ORT_TYPES = {"float32": np.float32, "float16": np.float16}


def checked_rank_graph(ed: EngineDir, no_graph_fix: str) -> str:
    """The kept rank graph's file name, after verifying it and its data file against config.json."""
    onnx_file = ed.onnx_file
    if onnx_file is None:
        raise TrtcError(f"{ed.path} holds no ONNX rank graphs, which the onnxruntime backend runs; "
                        f"{no_graph_fix}")
    ed.verify([onnx_file, art.onnx_data(onnx_file)])
    return onnx_file


def session_options(threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


class OnnxRuntimeSession:
    backend = "onnxruntime"

    def __init__(self, ed: EngineDir, threads: int | None = None):
        import onnxruntime as ort

        onnx_file = checked_rank_graph(ed, "rebuild it with `trtc build --keep-onnx`")
        if ed.dtype not in _ORT_TYPES:
            raise TrtcError(f"ONNX Runtime's CPU provider has no {ed.dtype} kernels for this graph; "
                            f"build with --dtype float16 or float32 to check numerics on CPU")
        so = session_options(threads)
        if ed.quantized:
            # Extended optimizations rewrite DequantizeLinear -> MatMul into kernels that also
            # quantize the activations (measured on SmolLM2 int8_wo: logits differ by up to 1.45,
            # 3.5% of argmaxes flip); the reference backend must compute the graph as written.
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.ed = ed
        try:
            self.sess = ort.InferenceSession(str(ed.path / onnx_file), so, providers=["CPUExecutionProvider"])
        except Exception as e:     # onnxruntime's pybind exception types are not importable by name
            if type(e).__name__ != "NotImplemented":
                raise
            why = str(e).split("NOT_IMPLEMENTED : ")[-1]
            algo = ed.config.quantization.get("quant_algo")
            raise TrtcError(f"ONNX Runtime {ort.__version__} cannot run {ed.path}'s rank graph"
                            f"{f' (--quant {algo})' if algo else ''}: {why}; run this engine dir with "
                            f"--backend tensorrt on a GPU of its target") from None
        self.names = art.cache_names(ed.spec.num_layers)
        self.cache: list = []

    def allocate(self, batch: int) -> None:
        import onnxruntime as ort

        s = self.ed.spec
        shape = art.cache_shape(batch, s.num_kv_heads, self.ed.max_seq_len, s.head_dim)
        zeros = np.zeros(shape, dtype=_ORT_TYPES[self.ed.dtype])
        self.cache = [ort.OrtValue.ortvalue_from_numpy(zeros.copy()) for _ in self.names]

    def keep(self, rows: list[int]) -> None:
        import onnxruntime as ort

        self.cache = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[rows])) for v in self.cache]

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray,
             lengths: np.ndarray | None = None) -> np.ndarray:
        io = self.sess.io_binding()
        io.bind_output(art.LOGITS)   # first, so it is get_outputs()[0]
        io.bind_cpu_input(art.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input(art.POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        for (past, present), value in zip(self.names, self.cache):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
        self.sess.run_with_iobinding(io)
        return io.get_outputs()[0].numpy().astype(np.float32, copy=False)
