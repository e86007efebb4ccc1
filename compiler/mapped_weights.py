"""The graph's external weights handed to TensorRT's ONNX parser as pointers into read-only memory
maps of their data files (compiler/build.py): the builder's own copy is the only one in anonymous
memory. ExternalTensor / external_tensors say where each weight lies and check its byte count."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtc.errors import TrtcError


# Bits per element of the ONNX types an external initializer may have; the 6-, 4- and 2-bit types
# are packed, so a tensor's bytes are ceil(numel * bits / 8).
_BITS = {"FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64, "BOOL": 8,
         "FLOAT16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "COMPLEX64": 64, "COMPLEX128": 128,
         "BFLOAT16": 16, "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8, "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8,
         "FLOAT8E8M0": 8, "UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4, "UINT2": 2, "INT2": 2, "FLOAT6E2M3": 6,
         "FLOAT6E3M2": 6}


@dataclass(frozen=True)
class ExternalTensor:
    """One initializer stored outside the graph: `length` bytes at `offset` in `file`."""
    name: str
    file: Path
    offset: int
    length: int


def external_tensors(onnx_path: Path) -> list[ExternalTensor]:
    """The graph's initializers whose data lives in external files (the graph's own, read without its
    weights). Initializers inside the proto stay there; the parser reads them itself."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(onnx_path), load_external_data=False)
    bits = {getattr(TensorProto, n): b for n, b in _BITS.items() if hasattr(TensorProto, n)}
    out = []
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        kv = {e.key: e.value for e in t.external_data}
        if t.data_type not in bits or "location" not in kv:
            what = TensorProto.DataType.Name(t.data_type) if t.data_type not in bits else "no location"
            raise TrtcError(f"weight {t.name!r} of {onnx_path.name} is external data trtc cannot map ({what}); "
                            f"export the model again with trtc")
        numel = 1
        for d in t.dims:
            numel *= d
        need = (numel * bits[t.data_type] + 7) // 8
        length = int(kv.get("length", need))
        if length != need:
            raise TrtcError(f"weight {t.name!r} of {onnx_path.name} has {length} bytes of external data, its shape "
                            f"{list(t.dims)} needs {need}; the graph is damaged: export it again")
        out.append(ExternalTensor(t.name, onnx_path.parent / kv["location"], int(kv.get("offset", 0)), length))
    return out


class MappedWeights:
    """Read-only memory maps of a graph's external data files. The pages belong to the page cache
    (reclaimable, not anonymous memory): TensorRT reads the weights from them without a copy.
    A context manager: the maps close on exit, so nothing may use an address after that."""

    def __init__(self, onnx_path: Path) -> None:
        self.tensors = external_tensors(onnx_path)
        self._maps: dict[Path, mmap.mmap] = {}
        self._base: dict[Path, int] = {}

    def __enter__(self) -> MappedWeights:
        try:
            for t in self.tensors:
                if t.file not in self._maps:
                    self._map(t)
                size = len(self._maps[t.file]) if t.file in self._maps else 0
                if t.offset + t.length > size:
                    raise TrtcError(f"weight {t.name!r} needs bytes {t.offset}..{t.offset + t.length} of "
                                    f"{t.file.name}, which has {size}: the data file is short or does not "
                                    f"belong to this graph; export the model again")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _map(self, t: ExternalTensor) -> None:
        import numpy as np

        try:
            with open(t.file, "rb") as f:     # the map keeps its own reference to the file
                if os.fstat(f.fileno()).st_size == 0:
                    return
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise TrtcError(f"cannot read the weights of {t.name!r} from {t.file}: {e.strerror}; "
                            f"keep the .onnx.data file next to its .onnx graph") from None
        self._maps[t.file] = m
        view = np.frombuffer(m, dtype=np.uint8)   # a read-only map has no ctypes.from_buffer: numpy gives its address
        self._base[t.file] = view.ctypes.data
        del view                                  # no exported buffer left, so the map can close

    def address(self, t: ExternalTensor) -> int:
        return self._base[t.file] + t.offset

    def __exit__(self, *exc: object) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        self._base.clear()


def _parse_with_mapped_weights(parser: Any, onnx_path: Path, weights: MappedWeights, flavour_name: str) -> None:
    """The parser gets the graph (its bytes: a few MB, the weights are external) and, per external
    initializer, a pointer into the maps; the network's constant layers then point into the maps
    (tests/compiler/test_build_weights.py checks the addresses). TensorRT-RTX 1.7's parse_from_file
    happens to map the data file itself (the same peak memory, docs/platform.md); this path does not
    depend on a parser version for that, and checks every weight's byte range before TensorRT runs."""

    def fail(step: str) -> TrtcError:
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no message"
        return TrtcError(f"the {flavour_name} ONNX parser rejected {onnx_path.name} ({step}): {errs}")

    if not parser.load_model_proto(onnx_path.read_bytes(), str(onnx_path)):
        raise fail("the graph")
    for t in weights.tensors:
        if t.length and not parser.load_initializer(t.name, weights.address(t), t.length):
            raise fail(f"weight {t.name!r}, {t.length} bytes")
    if not parser.parse_model_proto():
        raise fail("the network")
