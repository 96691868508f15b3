"""Flower ``ArrayRecord`` <-> gradshard layout and flat vector, with the dtypes that stay byte-identical.

Flower's FedAvg multiplies each array by a Python float, so a float32 (float64) array is averaged in float32
(float64) and an integer or boolean array comes back as float64. gradshard averages one floating dtype per round;
an ArrayRecord is accepted when all its arrays are float32, or all float64. Anything else is refused here, before a
client trains, with the name of the first offending array.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord

from gradshard.core.layout import ModelLayout
from gradshard.errors import LayoutError

EXACT_DTYPES = ("float32", "float64")


def record_arrays(record: ArrayRecord) -> dict[str, npt.NDArray[Any]]:
    """The record's arrays as numpy, in the record's order (deserialised with ``allow_pickle=False``)."""
    return {name: array.numpy() for name, array in record.items()}


def layout_of(arrays: dict[str, npt.NDArray[Any]]) -> ModelLayout:
    """The layout of a model's arrays, refusing dtypes whose Flower average gradshard would not reproduce."""
    if not arrays:
        raise LayoutError("the ArrayRecord is empty: there is nothing to aggregate")
    dtypes = {name: np.dtype(a.dtype).name for name, a in arrays.items()}
    for name, dtype in dtypes.items():
        if dtype not in EXACT_DTYPES:
            raise LayoutError(
                f"array {name!r} is {dtype}: gradshard aggregates float32 or float64 arrays only (Flower's FedAvg "
                f"would return a {'float64' if dtype != 'float16' else 'float16'} average of it); cast it to float32 "
                "before building the ArrayRecord, or keep integer buffers (e.g. BatchNorm's num_batches_tracked) "
                "out of it")
    if len(set(dtypes.values())) > 1:
        raise LayoutError(f"the arrays mix dtypes {sorted(set(dtypes.values()))}: one round averages one dtype; "
                          "cast every array to float32")
    return ModelLayout.from_arrays(arrays)


def flatten_record(record: ArrayRecord, layout: ModelLayout) -> npt.NDArray[Any]:
    """The record as one flat vector in ``layout`` order; raises :class:`LayoutError` if it does not match."""
    arrays = record_arrays(record)
    theirs = layout_of(arrays)
    if {t.name: t for t in theirs} != {t.name: t for t in layout}:  # Flower matches arrays by name
        raise LayoutError(f"the arrays ({theirs!r}, dtype {theirs.flat_dtype}) do not match the round's layout "
                          f"({layout!r}, dtype {layout.flat_dtype}): names, shapes and dtypes must be those the "
                          "server sent")
    return layout.flatten(arrays)


def to_record(layout: ModelLayout, flat: npt.NDArray[Any]) -> ArrayRecord:
    """An ArrayRecord of ``flat`` shaped by ``layout``, arrays in layout order."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in layout.unflatten(flat).items()})
