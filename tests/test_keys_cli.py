"""``gradshard keys`` (new, register, revoke, list), ``--require-signatures`` on aggregate, a signed training
run."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from gradshard.cli.common import ExitCode
from gradshard.cli.main import main
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.format.keys import update_key
from gradshard.format.round import RoundSpec, load_manifest, open_round
from gradshard.format.update import UpdateMeta
from gradshard.format.writer import write_update
from gradshard.security import keys
from gradshard.security.registry import KeyRegistry, key_record_key
from gradshard.store import LocalStore

LAYOUT = ModelLayout([TensorSpec("w", (8, 8), "float32")])


def gs(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def new_key(path: Path) -> tuple[str, str]:
    """``gradshard keys new``: (fingerprint, public key) as printed."""
    result = gs("keys", "new", str(path))
    assert result.exit_code == 0, result.output
    lines = dict(line.split(maxsplit=1) for line in result.output.splitlines()[:2])
    return lines["fingerprint"].strip(), lines["public"].removeprefix("key").strip()


def test_keys_new_writes_a_private_pem_0600_and_prints_its_fingerprint(tmp_path: Path) -> None:
    fp, public = new_key(tmp_path / "c0.pem")
    key = keys.load_private_key(tmp_path / "c0.pem")
    assert stat.S_IMODE((tmp_path / "c0.pem").stat().st_mode) == 0o600
    assert (tmp_path / "c0.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (fp, public) == (keys.fingerprint(key), keys.public_b64(key))
    again = gs("keys", "new", str(tmp_path / "c0.pem"))
    assert again.exit_code == ExitCode.ERROR and "refusing to overwrite" in again.output


def test_register_revoke_and_list(tmp_path: Path) -> None:
    store = tmp_path / "store"
    fp0, public0 = new_key(tmp_path / "c0.pem")
    fp1, _ = new_key(tmp_path / "c1.pem")
    (tmp_path / "c1.pub").write_bytes(keys.public_pem(keys.load_private_key(tmp_path / "c1.pem")))

    # register by base64 and by PEM file; registering again is a no-op; another client's key is refused
    assert gs("keys", "register", str(store), "c0", public0).exit_code == 0
    assert gs("keys", "register", str(store), "c1", str(tmp_path / "c1.pub")).exit_code == 0
    assert gs("keys", "register", str(store), "c0", public0).exit_code == 0
    stolen = gs("keys", "register", str(store), "c2", public0)
    assert stolen.exit_code == ExitCode.ERROR and "already registered for client 'c0'" in stolen.output
    bad = gs("keys", "register", str(store), "c2", "bm90IGEga2V5")
    assert bad.exit_code == ExitCode.ERROR and "decodes to 9 bytes" in bad.output

    revoked = gs("keys", "revoke", str(store), fp1, "--reason", "laptop\x1b[31m stolen")
    assert revoked.exit_code == 0, revoked.output
    assert "\x1b" not in revoked.output and "\\x1b" in revoked.output  # untrusted text made visible

    listed = gs("keys", "list", str(store), "--json")
    data = json.loads(listed.output)
    by_fp = {k["fingerprint"]: k for k in data["keys"]}
    assert by_fp[fp0]["client"] == "c0" and by_fp[fp0]["revoked"] is None
    assert by_fp[fp1]["revoked"]["reason"] == "laptop\x1b[31m stolen"
    assert data["problems"] == {}
    table = gs("keys", "list", str(store))
    assert table.exit_code == 0 and "active" in table.output and "revoked" in table.output


def test_hostile_registry_objects_are_listed_as_invalid_with_a_message(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    k0, k1, k2 = keys.generate(), keys.generate(), keys.generate()
    registry = KeyRegistry(store)
    for client, key in (("c0", k0), ("c1", k1), ("c2", k2)):
        registry.register(client, key.public_key())
    store.put(key_record_key("c0", keys.fingerprint(k0)), b" " * 100_000)  # huge
    store.put(key_record_key("c1", keys.fingerprint(k1)), b'{"client": "c1", "fingerprint": 7}')  # malformed
    good = store.get(key_record_key("c2", keys.fingerprint(k2))).decode()
    store.put(key_record_key("c2", keys.fingerprint(k2)),  # fingerprint mismatch: another key swapped in
              good.replace(keys.public_b64(k2), keys.public_b64(keys.generate())).encode())

    result = gs("keys", "list", str(tmp_path / "store"), "--json")

    problems = json.loads(result.output)["problems"]
    assert json.loads(result.output)["keys"] == []
    assert "over the 4,096 a record may have" in problems[key_record_key("c0", keys.fingerprint(k0))]
    assert "not a valid KeyRecord" in problems[key_record_key("c1", keys.fingerprint(k1))]
    assert "fingerprint mismatch" in problems[key_record_key("c2", keys.fingerprint(k2))]


def test_a_key_file_over_64_kib_is_refused_before_parsing(tmp_path: Path) -> None:
    (tmp_path / "big.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 70_000)
    with pytest.raises(keys.SecurityError, match="over the 65,536 a key file may have"):
        keys.load_private_key(tmp_path / "big.pem")
    result = gs("keys", "register", str(tmp_path / "s"), "c0", str(tmp_path / "big.pem"))
    assert result.exit_code == ExitCode.ERROR and "over the 65,536" in result.output


def test_an_encrypted_key_needs_its_passphrase(tmp_path: Path) -> None:
    key = keys.generate()
    keys.save_private_key(key, tmp_path / "k.pem", b"s3cret")
    with pytest.raises(keys.SecurityError, match="encrypted"):
        keys.load_private_key(tmp_path / "k.pem")
    with pytest.raises(keys.SecurityError, match="wrong passphrase"):
        keys.load_private_key(tmp_path / "k.pem", b"nope")
    assert keys.fingerprint(keys.load_private_key(tmp_path / "k.pem", b"s3cret")) == keys.fingerprint(key)


def test_aggregate_require_signatures_rejects_the_unsigned_client_by_name(tmp_path: Path) -> None:
    # Prepare: c0 signed with a registered key, c1 unsigned
    store = LocalStore(tmp_path / "store")
    open_round(store, RoundSpec.create(0, LAYOUT, chunk_elems=16, digest="blake3"))
    signer = keys.generate()
    KeyRegistry(store).register("c0", signer.public_key())
    for client, key in (("c0", signer), ("c1", None)):
        write_update(store, update_key(0, client), LAYOUT, np.ones(LAYOUT.numel, np.float32), UpdateMeta(
            client=client, round=0, examples=1, layout_digest=LAYOUT.digest(), chunk_elems=16, digest="blake3"),
            signer=key)

    # Execute
    result = gs("aggregate", "--store", str(tmp_path / "store"), "--round", "0", "--executor", "inline",
                "--shards", "2", "--require-signatures")

    # Assert
    assert result.exit_code == 0, result.output
    assert "rejected c1: unsigned" in result.output
    assert f"signed c0: key {keys.fingerprint(signer)[:12]}" in result.output
    manifest = load_manifest(store, "rounds/000000/manifest.json")
    assert [(c.client, c.signer) for c in manifest.clients] == [("c0", keys.fingerprint(signer))]


def test_a_signed_training_run_ends_with_every_client_signed(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    store_dir, keys_dir = tmp_path / "store", tmp_path / "keys"

    result = gs("train", "--store", str(store_dir), "--model", "mlp", "--clients", "3", "--epochs", "1",
                "--batch-size", "64", "--shards", "2", "--rounds", "2", "--require-signatures",
                "--keys-dir", str(keys_dir))

    assert result.exit_code == 0, result.output
    store = LocalStore(store_dir)
    registry = KeyRegistry(store)
    for r in (0, 1):
        manifest = load_manifest(store, f"rounds/{r:06d}/manifest.json")
        assert manifest.rejected == {} and manifest.spec.digest == "blake3"
        assert [c.client for c in manifest.clients] == ["client-0000", "client-0001", "client-0002"]
        for entry in manifest.clients:  # each signed by its own registered key, whose private half is in keys_dir
            assert entry.signer == keys.fingerprint(keys.load_private_key(keys_dir / f"{entry.client}.pem"))
            registry.lookup(entry.client, entry.signer)


def test_require_signatures_is_valid_in_a_toml_aggregation_table_and_the_flag_overrides_it() -> None:
    pytest.importorskip("torch")
    from gradshard.cli.train import train_config

    from_toml = train_config({"aggregation": {"require_signatures": True}, "keys_dir": "/k"}, {}, "test")
    assert from_toml.aggregation.require_signatures and from_toml.keys_dir == "/k"
    overridden = train_config({"aggregation": {"require_signatures": True}}, {"require_signatures": False}, "test")
    assert not overridden.aggregation.require_signatures
