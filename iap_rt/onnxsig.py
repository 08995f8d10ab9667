"""The input signature of an ONNX file (names and element types of the graph's inputs), read
straight from the protobuf wire format without loading any weights and without the ``onnx``
package: the runtime checks a network against its shape contract before (or without) opening
an ONNX Runtime session for it.

Wire format (protobuf encoding; field numbers from ``onnx/onnx.proto``): ``ModelProto.graph``
= 7; ``GraphProto.initializer`` = 5, ``.input`` = 11; ``ValueInfoProto.name`` = 1, ``.type``
= 2; ``TypeProto.tensor_type`` = 1; ``TypeProto.Tensor.elem_type`` = 1; ``TensorProto.name``
= 8. Every other field (nodes, weights, external-data records) is skipped by its length, so a
multi-GB file costs a few thousand seeks.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np

from iap_rt.errors import ArtifactError

# TensorProto.DataType -> numpy (the types a network of this project can take as input)
ELEM_TYPES = {
    1: np.dtype(np.float32),
    2: np.dtype(np.uint8),
    3: np.dtype(np.int8),
    5: np.dtype(np.int16),
    6: np.dtype(np.int32),
    7: np.dtype(np.int64),
    9: np.dtype(np.bool_),
    10: np.dtype(np.float16),
    11: np.dtype(np.float64),
}
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(f: BinaryIO) -> int | None:
    """One varint, or None at the end of the file."""
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise EOFError("truncated varint")
            return None
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7


def _fields(f: BinaryIO, end: int):
    """``(field number, wire type, value)`` of one message ending at offset ``end``; for a
    length-delimited field the value is its (start, end) and the file is left at its end
    unless the consumer reads it."""
    while f.tell() < end:
        key = _varint(f)
        if key is None:
            raise EOFError("truncated message")
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            yield field, wire, _varint(f)
        elif wire == _LEN:
            n = _varint(f)
            start = f.tell()
            if n is None or start + n > end:
                raise EOFError("field runs past its message")
            yield field, wire, (start, start + n)
            f.seek(start + n)
        elif wire in (_I64, _I32):
            f.seek(8 if wire == _I64 else 4, os.SEEK_CUR)
        else:
            raise ValueError(f"wire type {wire} is not protobuf's")
    if f.tell() != end:
        raise EOFError("field runs past its message")


def _string(f: BinaryIO, span: tuple[int, int]) -> str:
    f.seek(span[0])
    return f.read(span[1] - span[0]).decode("utf-8")


def _value_info(f: BinaryIO, span) -> tuple[str, int | None]:
    """(name, elem_type) of a ValueInfoProto (elem_type None: not a tensor)."""
    name, elem = "", None
    for field, wire, v in _fields(f, span[1]):
        if field == 1 and wire == _LEN:
            name = _string(f, v)
            f.seek(v[1])
        elif field == 2 and wire == _LEN:
            f.seek(v[0])
            for tf, tw, tv in _fields(f, v[1]):  # TypeProto
                if tf == 1 and tw == _LEN:  # tensor_type
                    f.seek(tv[0])
                    for ef, ew, ev in _fields(f, tv[1]):
                        if ef == 1 and ew == _VARINT:
                            elem = ev
                    f.seek(tv[1])
            f.seek(v[1])
    return name, elem


def _tensor_name(f: BinaryIO, span) -> str:
    name = ""
    for field, wire, v in _fields(f, span[1]):
        if field == 8 and wire == _LEN:
            name = _string(f, v)
            f.seek(v[1])
    return name


def read_inputs(path) -> dict[str, np.dtype | str]:
    """``{input name: numpy dtype}`` of the graph's inputs that are not initializers (what
    ONNX Runtime's ``session.get_inputs()`` lists), in graph order. An element type this
    module does not map stays as ``"elem_type N"``. Raises :class:`ArtifactError` for a file
    that is not a readable ONNX model."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(0)
            graph = None
            for field, wire, v in _fields(f, end):
                if field == 7 and wire == _LEN:
                    graph = v
            if graph is None:
                raise ValueError("no graph")
            f.seek(graph[0])
            inputs, initializers = [], set()
            for field, wire, v in _fields(f, graph[1]):
                if field == 11 and wire == _LEN:
                    f.seek(v[0])
                    inputs.append(_value_info(f, v))
                    f.seek(v[1])
                elif field == 5 and wire == _LEN:
                    f.seek(v[0])
                    initializers.add(_tensor_name(f, v))
                    f.seek(v[1])
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e}", fix="re-export the model.") from e
    except (EOFError, ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(
            f"{path} is not a readable ONNX model ({e})",
            fix="re-export the model (a killed copy or export leaves a truncated file).",
        ) from e
    return {
        name: ELEM_TYPES.get(elem, f"elem_type {elem}")
        for name, elem in inputs
        if name not in initializers
    }
