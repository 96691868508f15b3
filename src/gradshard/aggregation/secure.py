"""Secure aggregation's phase 1 (reducer ``secagg:<bits>``): reconstruct the masks to remove, from the shares the
surviving clients revealed; the shard functions then sum the masked words and remove them (:mod:`gradshard.security
.secagg`, :class:`gradshard.core.reducers.SecAggReducer`).

The protocol's records live beside the round, under ``rounds/<r>/secagg/``: ``directory.json`` (every masking
client's public keys and the threshold), ``shares/<from>/<to>`` (encrypted shares relayed between clients: the
server cannot read them) and ``reveal/<client>.json`` (what a survivor reveals once it knows who survived). The
survivors are the clients whose masked update the round accepted; the other clients of the directory dropped after
masking. A round mixing masked and plain updates is refused (the plain ones would leak; the masked ones would not
unmask): under policy ``skip`` the plain ones are rejected.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from gradshard.aggregation.phases import PhaseContext, register_phase
from gradshard.core.reducers import ReducerSpec
from gradshard.errors import RoundError, SecurityError
from gradshard.format.keys import secagg_prefix
from gradshard.format.masked import SECAGG
from gradshard.format.round import RoundManifest, check_enough
from gradshard.security.secagg import Advertised, unmasking_terms
from gradshard.store import Store

if TYPE_CHECKING:
    from gradshard.runtime.report import InvocationReport

log = logging.getLogger(__name__)
_MAX_RECORD = 4 << 20  # a directory or reveal record larger than this is not one


def directory_key(r: int) -> str:
    return f"{secagg_prefix(r)}/directory.json"


def share_key(r: int, sender: str, receiver: str) -> str:
    return f"{secagg_prefix(r)}/shares/{sender}/{receiver}"


def reveal_key(r: int, client: str) -> str:
    return f"{secagg_prefix(r)}/reveal/{client}.json"


def write_directory(store: Store, r: int, advertised: Sequence[Advertised], threshold: int,
                    weights: Mapping[str, float] | None = None) -> None:
    """The round's key directory: every masking client's public keys, the threshold, and with ``weights`` each
    client's weight in (0, 1] (it masks ``weight · update``; the aggregate is the survivors' weighted mean)."""
    record: dict[str, object] = {"threshold": threshold, "clients": {
        a.client: {"mask_key": a.mask_key, "share_key": a.share_key} for a in advertised}}
    if weights is not None:
        if set(weights) != {a.client for a in advertised} or not all(
                isinstance(w, int | float) and not isinstance(w, bool) and 0 < w <= 1 for w in weights.values()):
            raise SecurityError("weights: one float in (0, 1] for every client of the directory")
        record["weights"] = {c: float(w) for c, w in weights.items()}
    store.put(directory_key(r), json.dumps(record).encode())


class KeyDirectory(NamedTuple):
    """A round's key directory as read and checked once: the clients' public keys, the threshold, and the clients'
    weights (None: unweighted)."""

    clients: dict[str, Advertised]
    threshold: int
    weights: dict[str, float] | None


def read_directory(store: Store, r: int) -> KeyDirectory:
    """The round's key directory (bounded, parsed and checked; errors name what is wrong)."""
    key = directory_key(r)
    if not store.exists(key):
        raise RoundError(f"reducer secagg needs the round's key directory {key}")
    try:
        if store.size(key) > _MAX_RECORD:
            raise ValueError("too large")
        raw = json.loads(store.get(key))
        threshold = int(raw["threshold"])
        clients = {str(c): Advertised(str(c), str(v["mask_key"]), str(v["share_key"]))
                   for c, v in raw["clients"].items()}
        weights = None if raw.get("weights") is None else {str(c): float(w) for c, w in raw["weights"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RoundError(f"{key} is not a secure-aggregation key directory: {exc}") from None
    if not 1 < threshold <= len(clients):
        raise RoundError(f"{key}: threshold {threshold} must be in (1, {len(clients)}]")
    if weights is not None and (set(weights) != set(clients) or not all(0 < w <= 1 for w in weights.values())):
        raise RoundError(f"{key}: the weights must give every client of the directory one in (0, 1]")  # NaN too
    return KeyDirectory(clients, threshold, weights)


def write_reveal(store: Store, r: int, client: str, revealed: Mapping[str, Mapping[str, str]]) -> None:
    store.put(reveal_key(r, client), json.dumps(revealed).encode())


def _reveals(store: Store, r: int, survivors: Sequence[str]) -> dict[str, dict[str, dict[str, str]]]:
    out = {}
    for client in survivors:
        key = reveal_key(r, client)
        if store.exists(key) and store.size(key) <= _MAX_RECORD:
            try:
                out[client] = {str(p): {str(k): str(v) for k, v in e.items()}
                               for p, e in json.loads(store.get(key)).items()}
            except (ValueError, AttributeError) as exc:
                log.warning("ignoring %s: %s", key, exc)
    return out


def secure_round(manifest: RoundManifest, spec: ReducerSpec, run: PhaseContext) -> list[InvocationReport]:
    """Phase 1 of ``secagg``: the survivors' reveals -> the masks each shard removes (``manifest.masks``)."""
    r = manifest.round
    directory, threshold, weights = read_directory(run.store, r)
    for entry in list(manifest.clients):
        if entry.encoding != SECAGG:
            manifest.reject(entry.client, "a plain update in a secure-aggregation round (it would be summed "
                                          "unmasked into masked words); upload it masked")
        elif entry.client not in directory:
            manifest.reject(entry.client, "not in the round's secure-aggregation key directory")
    check_enough(manifest)
    survivors = [c.client for c in manifest.clients]
    revealed = _reveals(run.store, r, survivors)
    try:
        terms = unmasking_terms(r, list(directory), survivors, directory, revealed, threshold)
    except (SecurityError, ValueError, KeyError, TypeError) as exc:  # a malformed share, key or coordinate
        raise RoundError(f"round {r}: cannot unmask: {type(exc).__name__}: {str(exc)[:200]}") from None
    manifest.masks = terms
    if weights is not None:  # the clients masked weight · update: divide by the survivors' total weight
        manifest.secagg_weight = math.fsum(weights[c] for c in survivors)  # survivors are in the directory
    dropped = sorted(set(directory) - set(survivors))
    log.info("round %d: secure aggregation of %d survivors (%d dropped after masking), %d masks to remove", r,
             len(survivors), len(dropped), len(terms))
    return []


register_phase("secagg", secure_round, None)
