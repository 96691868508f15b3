"""Layouts from names and files, for commands that take ``--layout``: what :func:`load_layout` accepts.

- a zoo name (``resnet18``, ``mlp``, ...) or ``synthetic-<N>`` (:func:`gradshard.core.zoo.get_layout`);
- a JSON file: a layout as :meth:`ModelLayout.to_json` writes it (``[[name, shape, dtype], ...]``), or an object
  with a ``layout`` field of that form (a round's ``round.json``);
- a safetensors file: its tensors in file order. Right for files gradshard's writer made (updates, aggregates,
  models: file order is layout order); a checkpoint the plain safetensors library saved is ordered by dtype and
  name, not as the model's state, so save its layout as JSON instead.

Files are untrusted: JSON is read only up to :data:`MAX_LAYOUT_BYTES` and parsed strictly (bounded depth), a
safetensors header under the bounds of :func:`gradshard.format.update.read_header`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.core.zoo import get_layout
from gradshard.errors import GradshardError, LayoutError
from gradshard.format.update import MAX_HEADER_BYTES, _loads, read_header
from gradshard.store import LocalStore

MAX_LAYOUT_BYTES = MAX_HEADER_BYTES  # a layout of 100,000 tensors takes a few MB of JSON


def load_layout(source: str | Path) -> ModelLayout:
    """The layout named by ``source``: an existing ``.json`` or ``.safetensors`` file, else a zoo name."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".safetensors":
            return _from_safetensors(path)
        return _from_json(path)
    if isinstance(source, Path) or path.suffix in (".json", ".safetensors"):
        raise LayoutError(f"layout file {str(source)!r} does not exist")
    return get_layout(str(source))


def _from_json(path: Path) -> ModelLayout:
    with path.open("rb") as f:
        raw = f.read(MAX_LAYOUT_BYTES + 1)
    if len(raw) > MAX_LAYOUT_BYTES:
        raise LayoutError(f"layout file {str(path)!r} is over {MAX_LAYOUT_BYTES:,} bytes")
    try:
        data: Any = _loads(raw)
    except ValueError as exc:
        raise LayoutError(f"layout file {str(path)!r} is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        data = data.get("layout")
    if not isinstance(data, list):
        raise LayoutError(f"layout file {str(path)!r} holds no layout: expected [[name, shape, dtype], ...] or an "
                          "object with a 'layout' field of that form")
    if not all(isinstance(entry, list) and len(entry) == 3 for entry in data):
        raise LayoutError(f"layout file {str(path)!r}: every entry must be [name, shape, dtype]")
    return ModelLayout.from_json(data)


def _from_safetensors(path: Path) -> ModelLayout:
    store = LocalStore(path.parent)
    try:
        with store.open_reader(path.name) as reader:
            header = read_header(reader, path.name, path.stem)
    except GradshardError as exc:
        raise LayoutError(f"layout file {str(path)!r}: {exc}") from None
    ordered = sorted(header.tensors.items(), key=lambda item: (item[1].begin, item[1].end))
    return ModelLayout(TensorSpec(name, entry.shape, entry.dtype) for name, entry in ordered)
