"""``gradshard inspect FILE --layout ...``: zoo names, synthetic-<N>, layout and round JSON files, gradshard
safetensors files; one-line errors with the documented exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from click.testing import CliRunner

from gradshard.cli.main import main
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.core.zoo import get_layout
from gradshard.format.keys import spec_key
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import UpdateMeta
from gradshard.format.writer import update_metadata, write_update
from gradshard.store import LocalStore

CHUNK = 8
# a model layout in state order: a floating tensor named after the kept buffer, so plain safetensors reorders
MODEL = ModelLayout([TensorSpec("w", (3, 4), "float32"), TensorSpec("steps", (), "int64"),
                     TensorSpec("b", (4,), "float32")])
LAYOUT = MODEL.aggregated()


def _plain_update(tmp_path: Path) -> Path:
    """An update the plain library wrote: tensors by name (b, steps, w), the int64 buffer included."""
    store = LocalStore(tmp_path)
    open_round(store, RoundSpec.create(0, LAYOUT, chunk_elems=CHUNK))
    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((3, 4)).astype(np.float32), "steps": np.array(7, np.int64),
               "b": rng.standard_normal(4).astype(np.float32)}
    path = tmp_path / "alice.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata=update_metadata(LAYOUT, tensors, client="alice", round=0,
                                                                        examples=5, chunk_elems=CHUNK))
    return path


def _inspect(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["inspect", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("source", ["model.json", "layout.json", "round.json"])
def test_inspect_takes_the_layout_from_a_json_file_for_a_plain_safetensors_update(tmp_path: Path,
                                                                                   source: str) -> None:
    # Prepare: the model's layout (kept buffer included), the aggregated layout, and the round's spec
    path = _plain_update(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps(MODEL.to_json()))
    (tmp_path / "layout.json").write_text(json.dumps(LAYOUT.to_json()))
    (tmp_path / "round.json").write_bytes((tmp_path / spec_key(0)).read_bytes())

    # Execute
    without = _inspect(str(path), "--json")
    code, out, err = _inspect(str(path), "--json", "--layout", str(tmp_path / source))

    # Assert: without a layout the file order (b, w) does not fit; with one every chunk verifies
    assert without[0] == 3
    assert "pass the model's or the round's layout" in without[2]
    assert code == 0, err
    info = json.loads(out)
    assert (info["client"], info["tensors"], info["elements"], info["chunks_verified"]) == ("alice", 2, 16, 2)
    assert info["layout_digest"] == LAYOUT.digest()
    assert (info["format"], info["header_verified"]) == ("2", True)


@pytest.mark.parametrize(("name", "layout"), [("mlp", get_layout("mlp").aggregated()),
                                              ("synthetic-300", get_layout("synthetic-300"))])
def test_inspect_takes_a_zoo_name_or_synthetic_size_and_a_gradshard_file(tmp_path: Path, name: str,
                                                                         layout: ModelLayout) -> None:
    # Prepare: an update of that layout by gradshard's writer, and a second one to take the layout from
    store = LocalStore(tmp_path)
    vec = np.linspace(-1, 1, layout.numel, dtype=np.float32)
    meta = UpdateMeta(client="bob", round=0, examples=2, layout_digest=layout.digest(), chunk_elems=64)
    write_update(store, "bob.safetensors", layout, vec, meta)
    write_update(store, "ref.safetensors", layout, vec, meta)

    # Execute
    by_name = _inspect(str(tmp_path / "bob.safetensors"), "--json", "--layout", name)
    by_file = _inspect(str(tmp_path / "bob.safetensors"), "--json", "--layout", str(tmp_path / "ref.safetensors"))
    plain = _inspect(str(tmp_path / "bob.safetensors"), "--json")

    # Assert: the same verdict all three ways (without --layout it works as before)
    assert by_name[0] == by_file[0] == plain[0] == 0
    assert json.loads(by_name[1]) == json.loads(by_file[1]) == json.loads(plain[1])
    assert json.loads(plain[1])["elements"] == layout.numel


@pytest.mark.parametrize(("layout", "message"), [
    ("no-such-model", "unknown model 'no-such-model'; known:"),
    ("synthetic-1e30", "is over the 1.68e+12 elements an update can hold"),
    ("missing.json", "layout file 'missing.json' does not exist"),
    ("bad.json", "is not valid JSON"),
    ("deep.json", "nested deeper than 8 levels"),
    ("wrong.json", "does not match the object's layout digest"),
    ("notes.txt", "holds no layout"),
])
def test_inspect_layout_errors_are_one_line_with_exit_code_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             layout: str, message: str) -> None:
    # Prepare
    path = _plain_update(tmp_path)
    (tmp_path / "bad.json").write_text("[[\"w\", [3, 4], \"float32\"]")
    (tmp_path / "deep.json").write_text("[" * 10_000 + "]" * 10_000)
    (tmp_path / "wrong.json").write_text(json.dumps(get_layout("mlp").to_json()))
    (tmp_path / "notes.txt").write_text('{"not": "a layout"}')
    monkeypatch.chdir(tmp_path)

    # Execute
    code, _, err = _inspect(str(path), "--layout", layout)

    # Assert
    assert code == 3
    assert message in err
    assert err.startswith("error: ") and err.count("\n") == 1
