"""Model layout: the ordered tensors of a model and the flat vector they form.

A :class:`ModelLayout` is the ordered list of ``(name, shape, dtype)`` of a model's state. Floating tensors are the
*aggregated* part: flattened in layout order they form the flat update vector that GradsSharding cuts into shards.
Integer tensors (BatchNorm's ``num_batches_tracked``, step counters) are *kept*: they are never averaged; the server
keeps its own value (see :meth:`ModelLayout.split_state`).

A model may hold ``bfloat16`` tensors (numpy has no such dtype): a layout records them, and its aggregated part
carries them as float32 (a lossless widening, see :mod:`gradshard.core.bfloat16`); no flat vector is ever bfloat16.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from gradshard.core import bfloat16
from gradshard.errors import LayoutError

T = TypeVar("T")

# safetensors dtype names for the numpy dtypes an update may carry.
_ST_DTYPES: dict[str, str] = {
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
}
_NP_DTYPES: dict[str, str] = {v: k for k, v in _ST_DTYPES.items()}
UPDATE_DTYPES = ("float16", "float32", "float64")
# dtypes a model may hold that no update or flat vector does (numpy cannot hold them): name -> bytes per element
MODEL_ONLY_DTYPES: dict[str, int] = {"bfloat16": 2}


def safetensors_dtype(dtype: str) -> str:
    """The safetensors name (``F32``) of a numpy dtype name (``float32``)."""
    try:
        return _ST_DTYPES[dtype]
    except KeyError:
        raise LayoutError(f"dtype {dtype!r} cannot be stored; supported: {sorted(_ST_DTYPES)}") from None


def numpy_dtype(st_dtype: str) -> str:
    """The numpy dtype name (``float32``) of a safetensors dtype name (``F32``)."""
    try:
        return _NP_DTYPES[st_dtype]
    except KeyError:
        if st_dtype == "BF16":
            raise LayoutError("safetensors dtype 'BF16' (bfloat16) is not supported in updates: write bfloat16 "
                              "tensors as float32 (exact; see layout.aggregated())") from None
        raise LayoutError(f"safetensors dtype {st_dtype!r} is not supported; supported: {sorted(_NP_DTYPES)}") from None


def tensor_dtype(name: str, tensor: Any) -> str:
    """The dtype name (``float32``, ``bfloat16``, ``int64``) of a numpy array or a torch tensor."""
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        raise LayoutError(f"tensor {name!r} is a {type(tensor).__name__}, not an array or tensor")
    text = str(dtype)
    if text.startswith("torch."):
        return text.removeprefix("torch.")
    try:
        return str(np.dtype(dtype).name)
    except TypeError:
        raise LayoutError(f"tensor {name!r} has dtype {text!r}, which gradshard cannot store") from None


def as_numpy(name: str, value: Any) -> npt.NDArray[Any]:
    """``value`` as a numpy array: an array as it is, a torch tensor's CPU data (bfloat16 widened exactly to
    float32, since numpy has no bfloat16). torch is never imported unless a bfloat16 tensor is given."""
    if isinstance(value, np.ndarray):
        return value
    if not hasattr(value, "detach"):
        return np.asarray(value)
    tensor = value.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
        import torch

        return bfloat16.to_float32(tensor.contiguous().view(torch.int16).numpy())
    try:
        array: npt.NDArray[Any] = tensor.numpy()
    except TypeError as exc:
        raise LayoutError(f"tensor {name!r}: {exc}") from None
    return array


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model: its name, shape and numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not self.name:
            raise LayoutError("a tensor needs a non-empty name")
        if any((not isinstance(d, int)) or d < 0 for d in self.shape):
            raise LayoutError(f"tensor {self.name!r} has an invalid shape {self.shape!r}")
        if self.dtype not in MODEL_ONLY_DTYPES:
            safetensors_dtype(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return MODEL_ONLY_DTYPES.get(self.dtype) or np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_floating(self) -> bool:
        return self.dtype in MODEL_ONLY_DTYPES or np.issubdtype(np.dtype(self.dtype), np.floating)


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor sits in the flat vector: elements ``[start, stop)``."""

    spec: TensorSpec
    start: int
    stop: int


class ModelLayout:
    """An ordered, immutable list of tensor specs with the flat-vector arithmetic on top."""

    def __init__(self, tensors: Iterable[TensorSpec]) -> None:
        self.tensors: tuple[TensorSpec, ...] = tuple(tensors)
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise LayoutError(f"duplicate tensor names in layout: {dup}")
        slots: list[TensorSlot] = []
        offset = 0
        for spec in self.tensors:
            slots.append(TensorSlot(spec, offset, offset + spec.numel))
            offset += spec.numel
        self.slots: tuple[TensorSlot, ...] = tuple(slots)
        self._by_name = {s.spec.name: s for s in slots}
        self._memo: dict[str, Any] = {}

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: Mapping[str, npt.NDArray[Any]]) -> ModelLayout:
        """Layout of a dict of numpy arrays, in the dict's order."""
        return cls(TensorSpec(k, tuple(int(d) for d in v.shape), np.dtype(v.dtype).name) for k, v in arrays.items())

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any]) -> ModelLayout:
        """Layout of a state in its order: torch tensors (a ``state_dict()``) or numpy arrays, any stored dtype.

        Floating tensors (bfloat16 included) form :meth:`aggregated`, integer and bool buffers :meth:`kept`.
        No torch import: a tensor is read through its ``dtype`` and ``shape``."""
        specs = []
        for name, tensor in state_dict.items():
            dtype = tensor_dtype(name, tensor)
            try:
                specs.append(TensorSpec(str(name), tuple(int(d) for d in tensor.shape), dtype))
            except LayoutError as exc:
                raise LayoutError(f"tensor {name!r}: {exc}") from None
        return cls(specs)

    @classmethod
    def from_module(cls, module: Any) -> ModelLayout:
        """Layout of a ``torch.nn.Module``'s ``state_dict()``: parameters and buffers in state order.

        torch is not imported here (the module brings it), so ``import gradshard`` never loads it."""
        state_dict = getattr(module, "state_dict", None)
        if not callable(state_dict):
            raise LayoutError(f"expected a torch.nn.Module (something with state_dict()), got {type(module).__name__}")
        return cls.from_state_dict(state_dict())

    @classmethod
    def from_json(cls, data: Sequence[Sequence[Any]]) -> ModelLayout:
        """Inverse of :meth:`to_json`; validates every entry."""
        try:
            return cls(TensorSpec(str(n), tuple(int(d) for d in s), str(t)) for n, s, t in data)
        except (TypeError, ValueError) as exc:
            raise LayoutError(f"malformed layout description: {exc}") from exc

    @classmethod
    def shared(cls, data: Sequence[Sequence[Any]]) -> ModelLayout:
        """:meth:`from_json`, the same object for the same description while it is among the last few asked for:
        what a layout computes once (:meth:`memo`) then serves every round of a run, not only one."""
        try:
            key = tuple((n, tuple(s), t) for n, s, t in data)
            hash(key)
        except (TypeError, ValueError):
            return cls.from_json(data)  # malformed: the error names the problem
        return _shared_layout(key)

    def to_json(self) -> list[list[Any]]:
        return [[t.name, list(t.shape), t.dtype] for t in self.tensors]

    # --- views --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self.tensors)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelLayout) and self.tensors == other.tensors

    def __hash__(self) -> int:
        return hash(self.tensors)

    def __repr__(self) -> str:
        return f"ModelLayout({len(self.tensors)} tensors, {self.numel:,} elements)"

    def memo(self, name: str, build: Callable[[ModelLayout], T]) -> T:
        """``build(self)``, computed once per layout object under ``name`` (a layout is immutable)."""
        if name not in self._memo:
            self._memo[name] = build(self)
        return cast(T, self._memo[name])

    def slot(self, name: str) -> TensorSlot:
        try:
            return self._by_name[name]
        except KeyError:
            raise LayoutError(f"tensor {name!r} is not in the layout") from None

    @property
    def numel(self) -> int:
        return self.slots[-1].stop if self.slots else 0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def dtypes(self) -> set[str]:
        return {t.dtype for t in self.tensors}

    def digest(self) -> str:
        """A content hash of names, shapes and dtypes (sha256 of the canonical JSON)."""
        blob = json.dumps(self.to_json(), separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def aggregated(self, dtype: str = "float32") -> ModelLayout:
        """The part that is averaged: every floating tensor, in order, carried as ``dtype``."""
        if dtype not in UPDATE_DTYPES:
            raise LayoutError(f"update dtype must be one of {UPDATE_DTYPES}, got {dtype!r}")
        return ModelLayout(TensorSpec(t.name, t.shape, dtype) for t in self.tensors if t.is_floating)

    def kept(self) -> ModelLayout:
        """The part that is not averaged: integer and boolean buffers, kept from the server's model."""
        return ModelLayout(t for t in self.tensors if not t.is_floating)

    def split_state(
        self, state: Mapping[str, npt.NDArray[Any]]
    ) -> tuple[dict[str, npt.NDArray[Any]], dict[str, npt.NDArray[Any]]]:
        """Split a state into (aggregated floating tensors, kept integer tensors), checking it matches."""
        self.check_arrays(state)
        floating = {t.name: state[t.name] for t in self.tensors if t.is_floating}
        kept = {t.name: state[t.name] for t in self.tensors if not t.is_floating}
        return floating, kept

    def assemble(self, floating: Mapping[str, Any], kept: Mapping[str, Any]) -> dict[str, Any]:
        """The full state in layout order from averaged floating tensors and the server's kept buffers."""
        merged = {**kept, **floating}
        self.check_arrays(merged)
        return {t.name: merged[t.name] for t in self.tensors}

    # --- flat vector ---------------------------------------------------------------------------------------
    @property
    def flat_dtype(self) -> str:
        """The single dtype of the flat vector; a layout with mixed dtypes has none."""
        dtypes = self.dtypes
        if len(dtypes) != 1:
            raise LayoutError(
                f"a flat vector needs one dtype but the layout has {sorted(dtypes)}; use layout.aggregated()"
            )
        dtype = next(iter(dtypes))
        if dtype in MODEL_ONLY_DTYPES:
            raise LayoutError(f"a flat vector cannot be {dtype} (numpy has no such dtype); use layout.aggregated(), "
                              f"which carries {dtype} tensors as float32 without loss")
        return dtype

    def check_arrays(self, arrays: Mapping[str, Any]) -> None:
        """Raise :class:`LayoutError` naming the first tensor that is missing, extra or of the wrong shape."""
        missing = [t.name for t in self.tensors if t.name not in arrays]
        extra = [k for k in arrays if k not in self._by_name]
        if missing or extra:
            raise LayoutError(f"state does not match layout: missing {missing[:5]}, unexpected {extra[:5]}")
        for spec in self.tensors:
            shape = tuple(int(d) for d in arrays[spec.name].shape)
            if shape != spec.shape:
                raise LayoutError(f"tensor {spec.name!r} has shape {shape}, layout says {spec.shape}")

    def flatten(self, arrays: Mapping[str, npt.NDArray[Any]], out: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]:
        """Concatenate ``arrays`` (numpy arrays or torch tensors) in layout order into one 1-D vector of the layout's
        dtype (casting if needed)."""
        self.check_arrays(arrays)
        dtype = self.flat_dtype
        if out is None:
            out = np.empty(self.numel, dtype=dtype)
        elif out.shape != (self.numel,) or out.dtype != np.dtype(dtype):
            raise LayoutError(f"output buffer must be ({self.numel},) {dtype}, got {out.shape} {out.dtype}")
        for slot in self.slots:
            out[slot.start : slot.stop] = as_numpy(slot.spec.name, arrays[slot.spec.name]).reshape(-1)
        return out

    def unflatten(self, flat: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
        """Views of ``flat`` shaped as the layout's tensors (no copy)."""
        if flat.ndim != 1 or flat.shape[0] != self.numel:
            raise LayoutError(f"flat vector has shape {flat.shape}, layout needs ({self.numel},)")
        return {s.spec.name: flat[s.start : s.stop].reshape(s.spec.shape) for s in self.slots}


@functools.lru_cache(maxsize=8)
def _shared_layout(key: tuple[tuple[Any, tuple[Any, ...], Any], ...]) -> ModelLayout:
    return ModelLayout.from_json(key)
