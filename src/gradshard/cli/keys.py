"""``gradshard keys``: client key pairs and the key registry in a store (new, register, revoke, list)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gradshard.cli.common import HELP_OPTIONS, console, open_cli_store
from gradshard.cli.console import untrusted
from gradshard.security import keys as keyfiles
from gradshard.security.registry import KeyRegistry


@click.group(context_settings=HELP_OPTIONS)
def keys() -> None:
    """Client identity: Ed25519 key pairs and the registry of public keys in a store (security/)."""


@keys.command("new", context_settings=HELP_OPTIONS)
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--passphrase-env", default=None, metavar="VAR",
              help="Encrypt the PEM with the passphrase in this environment variable [default: not encrypted].")
def new(out: str, passphrase_env: str | None) -> None:
    """Write a new private key to OUT (PEM, mode 0600); print its fingerprint and public key (base64)."""
    import os

    passphrase = None
    if passphrase_env is not None:
        value = os.environ.get(passphrase_env)
        if not value:
            raise click.UsageError(f"--passphrase-env {passphrase_env}: the variable is not set or empty")
        passphrase = value.encode()
    key = keyfiles.generate()
    keyfiles.save_private_key(key, out, passphrase)
    click.echo(f"fingerprint {keyfiles.fingerprint(key)}")
    click.echo(f"public key  {keyfiles.public_b64(key)}")
    console.print(f"wrote {untrusted(out)} (mode 0600); register the public key with: gradshard keys register "
                  "STORE CLIENT PUBLIC_KEY", highlight=False)


@keys.command("register", context_settings=HELP_OPTIONS)
@click.argument("store_location", metavar="STORE")
@click.argument("client")
@click.argument("public_key", metavar="PUBLIC_KEY_FILE_OR_B64")
def register(store_location: str, client: str, public_key: str) -> None:
    """Register a public key (a PEM or base64 file, or the base64 itself) for CLIENT in STORE."""
    store = open_cli_store(store_location, must_exist=False)
    record = KeyRegistry(store).register(client, keyfiles.load_public_key(public_key))
    console.print(f"registered key {record.fingerprint} for client {untrusted(record.client)}", highlight=False)


@keys.command("revoke", context_settings=HELP_OPTIONS)
@click.argument("store_location", metavar="STORE")
@click.argument("fingerprint")
@click.option("--reason", required=True, help="Why (shown when an update signed by it is rejected).")
def revoke(store_location: str, fingerprint: str, reason: str) -> None:
    """Revoke the key FINGERPRINT in STORE for good (its client may register a new key)."""
    store = open_cli_store(store_location, must_exist=True)
    revocation = KeyRegistry(store).revoke(fingerprint, reason)
    owner = f" of client {untrusted(revocation.client)}" if revocation.client else " (registered for no client)"
    console.print(f"key {revocation.fingerprint}{owner} revoked on {untrusted(revocation.date)}: "
                  f"{untrusted(revocation.reason)}", highlight=False)


@keys.command("list", context_settings=HELP_OPTIONS)
@click.argument("store_location", metavar="STORE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def list_keys(store_location: str, as_json: bool) -> None:
    """List registered keys (with their revocation, if any) and registry objects that are not valid."""
    store = open_cli_store(store_location, must_exist=True)
    registry = KeyRegistry(store)
    records, bad_records = registry.records()
    revocations, bad_revocations = registry.revocations()
    revoked = {r.fingerprint: r for r in revocations}
    problems = {**bad_records, **bad_revocations}
    if as_json:
        click.echo(json.dumps({
            "keys": [{**r.model_dump(), "revoked": revoked[r.fingerprint].model_dump()
                      if r.fingerprint in revoked else None} for r in records],
            "revocations": [r.model_dump() for r in revocations], "problems": problems}))
        return
    for r in records:
        state = (f"[red]revoked {untrusted(revoked[r.fingerprint].date)}: {untrusted(revoked[r.fingerprint].reason)}"
                 "[/]" if r.fingerprint in revoked else "[green]active[/]")
        console.print(f"{untrusted(r.client)}  {r.fingerprint}  registered {untrusted(r.registered_at)}  {state}",
                      highlight=False)
    listed = {r.fingerprint for r in records}
    for rev in revocations:
        if rev.fingerprint not in listed:
            console.print(f"(unregistered)  {rev.fingerprint}  [red]revoked {untrusted(rev.date)}: "
                          f"{untrusted(rev.reason)}[/]", highlight=False)
    for key, problem in problems.items():
        console.print(f"[yellow]invalid[/] {untrusted(key)}: {untrusted(problem)}", highlight=False)
    if not records and not revocations and not problems:
        console.print(f"no keys registered in {untrusted(Path(store_location))}", highlight=False)
