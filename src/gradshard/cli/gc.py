"""``gradshard gc``: abort and delete the uploads nobody finished (one call: :meth:`Store.collect_stale_uploads`),
and the records of spent invocation-token ids (:func:`gradshard.security.tokens.collect_spent_token_ids`)."""

from __future__ import annotations

import re

import click

from gradshard.cli.common import HELP_OPTIONS, console, open_cli_store
from gradshard.security.tokens import collect_spent_token_ids
from gradshard.store import STALE_UPLOAD_S

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``2d`` → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise click.BadParameter(f"{text!r} is not an age; use a number with s, m, h or d (e.g. 1h)",
                                 param_hint="--older-than")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@click.command(context_settings=HELP_OPTIONS)
@click.option("--store", "location", required=True, help="Store: a directory or s3://bucket/prefix.")
@click.option("--older-than", default=f"{STALE_UPLOAD_S / 3600:g}h", show_default=True,
              help="Collect uploads nobody wrote for this long (s, m, h, d). Keep it above the longest function "
                   "timeout of any round that may be running: a live round's upload is written while it runs.")
@click.option("--dry-run", is_flag=True, help="Only list what would be collected.")
def gc(location: str, older_than: str, dry_run: bool) -> None:
    """Abort and delete stale uploads: incomplete local uploads, S3 multipart uploads and their fragments; and the
    recorded ids of invocation tokens that have expired."""
    store = open_cli_store(location, must_exist=True)
    found = store.collect_stale_uploads(parse_age(older_than), dry_run=dry_run)
    for upload in found:
        console.print(f"{'would collect' if dry_run else 'collected'} upload {upload.upload_id} of "
                      f"{upload.key or '(unknown key)'}: {upload.size} bytes, idle {upload.idle_s / 3600:.1f} h")
    total = sum(u.size for u in found)
    console.print(f"{'would collect' if dry_run else 'collected'} {len(found)} stale upload(s), {total} bytes")
    spent = collect_spent_token_ids(store, dry_run=dry_run)
    if spent:
        console.print(f"{'would collect' if dry_run else 'collected'} {len(spent)} spent token id(s) of expired "
                      "invocation tokens")
