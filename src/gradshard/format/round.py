"""A round as data in the store: its spec, its client updates and the validated manifest.

Keys (``<r>`` is the zero-padded round number)::

    rounds/<r>/round.json                    RoundSpec: expected layout, chunk size and digest, base model, cohort
    rounds/<r>/updates/<client>.safetensors  one update per client
    rounds/<r>/manifest.json                 the validated, canonically ordered clients (and the rejected ones)
    rounds/<r>/aggregate.safetensors         the aggregated update (same format as an update)
    rounds/<r>/reports.json                  the invocation reports of the aggregation
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gradshard.core import checksum, digests
from gradshard.core.coverage import CoverageMap
from gradshard.core.digests import DigestName
from gradshard.core.layout import ModelLayout
from gradshard.core.reduce import MAX_EXAMPLES
from gradshard.core.reducers import normalised_weights
from gradshard.errors import (
    GradshardError,
    ObjectNotFoundError,
    RoundError,
    SecurityError,
    StoreError,
    UnsafeObjectError,
    UpdateError,
)
from gradshard.format.compact import ClientReader, open_client_update
from gradshard.format.keys import UPDATE_SUFFIX, check_client_id, manifest_key, round_prefix, spec_key
from gradshard.format.update import UpdateMeta, UpdateReader, Validated
from gradshard.store import Store

if TYPE_CHECKING:
    from gradshard.security.registry import KeyRegistry

log = logging.getLogger(__name__)
Policy = Literal["skip", "fail"]


class RoundSpec(BaseModel):
    """What the server expects of a round's updates. ``layout`` is the aggregated layout (one floating dtype).

    ``digest`` is the chunk digest algorithm every update (and the aggregate) of the round uses: ``xxh3_64``
    detects accidents, ``blake3`` and ``sha256`` are cryptographic (what a signature over the digests needs).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=0)
    layout: list[list[Any]]
    chunk_elems: int = Field(ge=1)
    digest: DigestName = "xxh3_64"
    base_model: str = ""
    base_key: str = Field(default="", description="the base model's key: elements no client covers keep its value "
                                                  "(coverage-mean); empty: they stay 0, the updates are deltas")
    cohort: list[str] | None = None
    min_clients: int = Field(default=1, ge=1)

    @classmethod
    def create(cls, r: int, layout: ModelLayout, *, chunk_elems: int | None = None, base_model: str = "",
               cohort: list[str] | None = None, min_clients: int = 1,
               digest: DigestName = "xxh3_64", base_key: str = "") -> RoundSpec:
        layout.flat_dtype  # noqa: B018 - raises unless the layout has one dtype
        return cls(round=r, layout=layout.to_json(), base_model=base_model, cohort=cohort, min_clients=min_clients,
                   chunk_elems=chunk_elems or checksum.default_chunk_elems(layout.numel), digest=digest,
                   base_key=base_key)

    def model_layout(self) -> ModelLayout:
        """The layout as a :class:`ModelLayout` (one object for every spec of the same layout among the last few:
        plans and functions ask for it often, and what it caches serves every round)."""
        return self.parsed_layout

    @cached_property
    def parsed_layout(self) -> ModelLayout:
        return ModelLayout.shared(self.layout)


#: Byte runs a client entry records at most (more, as in a file sorted by tensor name: functions parse its header).
MAX_MANIFEST_RUNS = 8


class ClientEntry(BaseModel):
    """One accepted client of a round: its object, its scalar weight and, if it trained only part of the model,
    its coverage (tensor name -> leading extent per dimension; tensors not named were not trained)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    client: str
    key: str
    examples: int = Field(ge=1, le=MAX_EXAMPLES)
    header_sha256: str
    size: int
    # 0 until weights are assigned (examples, uniform or the server's)
    weight: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    coverage: dict[str, tuple[int, ...]] | None = None
    # a factor on the normalised weight set by a phase: central DP's clip factor min(1, C / norm) (with the update's
    # L2 norm), FLTrust's ‖g₀‖ / ‖gᵢ‖; 1 (and no norm) otherwise
    scale: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    norm: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    # the fingerprint of the key whose signature was verified at validation (rounds that require signatures only)
    signer: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    # the object holds only the covered elements, in layout order (gradshard.format.compact)
    compact: bool = False
    encoding: str = ""  # how the update stores its values: "" (the layout's dtype), "int8", "topk"
    # a full-size update's data as validated: (flat start, flat stop, file offset) runs, recorded when there are few
    # (a file in layout order has one), so that functions reopening it need not parse its tensor entries again
    runs: tuple[tuple[int, int, int], ...] | None = Field(default=None, max_length=MAX_MANIFEST_RUNS)

    def validated(self) -> Validated | None:
        """What functions may trust of the object besides its header's sha256 (None: reparse it)."""
        return Validated(self.size, self.runs) if self.runs is not None and not self.compact else None

    @property
    def partial(self) -> bool:
        return self.coverage is not None


Weighting = Literal["examples", "uniform", "server"]
# A client holding more than this share of a round's weight while at least two others take part is named in the
# manifest's ``warnings`` and in the log: the aggregate is then mostly that one client (an inflated example count?).
DOMINANT_SHARE = 0.5


def assign_weights(manifest: RoundManifest, weighting: Weighting,
                   server_weights: Mapping[str, float] | None = None) -> RoundManifest:
    """Set every client's scalar weight: its example count, 1, or the value the server set for it.

    With ``server``, a client the server gave no weight (or a weight that is not finite and > 0) is rejected.
    A dominant client (:data:`DOMINANT_SHARE`) is warned about, never rejected: it may be honest."""
    clients = []
    for entry in manifest.clients:
        if weighting == "examples":
            weight = float(entry.examples)
        elif weighting == "uniform":
            weight = 1.0
        else:
            weight = float((server_weights or {}).get(entry.client, math.nan))
            if not (math.isfinite(weight) and weight > 0):
                manifest.rejected[entry.client] = (f"the server set no usable weight for it (got {weight!r}); "
                                                   "weights must be finite and > 0")
                continue
        clients.append(entry.model_copy(update={"weight": weight}))
    manifest.clients = clients
    manifest.warnings = dominance_warnings(clients, weighting)
    for client, warning in manifest.warnings.items():
        log.warning("client %r %s", client, warning)
    return manifest


def dominance_warnings(clients: list[ClientEntry], weighting: Weighting) -> dict[str, str]:
    """Client -> warning for each client holding more than :data:`DOMINANT_SHARE` of the weight (N >= 3)."""
    if len(clients) < 3:
        return {}
    shares = normalised_weights([c.weight for c in clients])
    warnings = {}
    for entry, share in zip(clients, shares, strict=True):
        if share > DOMINANT_SHARE:
            if weighting == "examples":
                amount = f"{entry.examples} of {sum(c.examples for c in clients)} examples"
            else:
                amount = f"server weight {entry.weight!r}"
            warnings[entry.client] = (f"holds {share:.4%} of the round's weight (more than {DOMINANT_SHARE:.0%}): "
                                      f"{amount}; the aggregate is mostly this client — check its example count, "
                                      "or aggregate with weighting 'uniform' or 'server'")
    return warnings


class RoundManifest(BaseModel):
    """The validated inputs of one aggregation: accepted clients sorted by id, rejected ones with reasons."""

    model_config = ConfigDict(extra="forbid")

    round: int
    spec: RoundSpec
    clients: list[ClientEntry]
    rejected: dict[str, str] = Field(default_factory=dict)
    warnings: dict[str, str] = Field(default_factory=dict)  # accepted clients to look at (a dominant weight)
    # central DP: the mean divides by this many clients (the expected cohort), not by the number accepted
    denominator: int | None = Field(default=None, ge=1)
    privacy: dict[str, float | int | str] | None = None  # central DP: what this round's release cost
    # selecting reducers: {"reducer", "selected", "record" (key of the distances and scores), "record_sha256"}
    selection: dict[str, str | list[str]] | None = None
    # secagg: the masks to remove from the survivors' sum, (key hex, sign), reconstructed by the phase
    masks: list[tuple[str, int]] | None = None
    # secagg: the survivors' total weight when the clients masked weighted updates (None: divide by their count)
    secagg_weight: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    def scales(self) -> list[float] | None:
        """Per-client factors on the normalised weights: clip factor × (accepted / denominator); None when every
        factor is 1 (no central DP), so plain rounds keep their exact bytes."""
        if self.denominator is None and all(c.scale == 1.0 for c in self.clients):
            return None
        n = len(self.clients)
        ratio = n / (self.denominator or n)
        return [c.scale * ratio for c in self.clients]

    def reject(self, client: str, reason: str) -> None:
        self.clients = [c for c in self.clients if c.client != client]
        self.rejected[client] = reason

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1).encode()


def _load_json_model(store: Store, key: str, model: type[RoundSpec] | type[RoundManifest]) -> Any:
    raw = store.get(key)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise GradshardError(f"{key} is not a valid {model.__name__}: {exc}") from None


def open_round(store: Store, spec: RoundSpec) -> None:
    """Write the round spec (clients may upload after this)."""
    store.put(spec_key(spec.round), spec.model_dump_json(indent=1).encode())


def load_spec(store: Store, r: int) -> RoundSpec:
    if not store.exists(spec_key(r)):
        raise RoundError(f"round {r} has no {spec_key(r)}; open it with gradshard.format.round.open_round first")
    spec: RoundSpec = _load_json_model(store, spec_key(r), RoundSpec)
    if spec.round != r:
        raise RoundError(f"{spec_key(r)} describes round {spec.round}, not {r}")
    return spec


def load_manifest(store: Store, key: str, sha256: str | None = None) -> RoundManifest:
    """Read a manifest; with ``sha256`` refuse one that changed since the driver wrote it."""
    raw = store.get(key)
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise RoundError(f"{key} changed since the plan was made (sha256 mismatch)")
    try:
        return RoundManifest.model_validate_json(raw)
    except ValidationError as exc:
        raise RoundError(f"{key} is not a valid manifest: {exc}") from None


def write_manifest(store: Store, manifest: RoundManifest, *, unless: str | None = None) -> str:
    """Store the manifest atomically; returns its sha256 (functions check it). ``unless``: the sha256 of the
    manifest already stored, when the caller wrote it: the same bytes are not written again."""
    blob = manifest.to_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    if sha != unless:
        store.put(manifest_key(manifest.round), blob)
    return sha


def check_meta(spec: RoundSpec, layout_digest: str, client: str, meta: UpdateMeta) -> None:
    """Refuse an update (or a round's server-side update) whose metadata is not for this round and layout."""
    if meta.kind != "update":
        raise UpdateError(client, f"object is a {meta.kind!r}, not an update")
    if meta.round != spec.round:
        raise UpdateError(client, f"update is for round {meta.round}, this is round {spec.round}")
    if spec.base_model and meta.base_model != spec.base_model:
        raise UpdateError(client, f"update was trained from base model {meta.base_model[:12] or '(none)'}, "
                                  f"the round's base model is {spec.base_model[:12]}")
    if meta.layout_digest != layout_digest:
        raise UpdateError(client, "metadata layout digest differs from the round's layout")
    if meta.chunk_elems != spec.chunk_elems:
        raise UpdateError(client, f"chunk size {meta.chunk_elems} differs from the round's {spec.chunk_elems}")
    if meta.digest != spec.digest:
        raise UpdateError(client, f"chunk digest algorithm {meta.digest} differs from the round's {spec.digest}; "
                                  f"write the update with digest={spec.digest!r}")


def prepare_round(store: Store, r: int, policy: Policy = "skip", weighting: Weighting = "examples",
                  server_weights: Mapping[str, float] | None = None,
                  require_signatures: bool = False) -> RoundManifest:
    """Validate every update's header, metadata, layout and coverage (reading headers only), build the manifest and
    give every client its weight (:func:`assign_weights`).

    Bad updates are rejected with a reason naming the client; with ``policy='fail'`` the first one raises.
    Data-level faults (checksums, non-finite values) are found later by the functions that read the data.

    ``require_signatures``: the round's digest must be cryptographic, and every update must be signed by a key the
    store's registry holds for its client (not revoked), over its own metadata and verified header digest
    (:func:`gradshard.security.signing.verify_signed_update`); the manifest records each signer. Without it,
    signatures are ignored: neither checked nor recorded (an unverified signer must not show up as an identity).
    """
    spec = load_spec(store, r)
    registry = _registry_for(store, spec) if require_signatures else None
    layout = spec.model_layout()
    digest = layout.digest()
    prefix = f"{round_prefix(r)}/updates/"
    accepted: dict[str, ClientEntry] = {}
    rejected: dict[str, str] = {}
    for key in store.list(prefix):
        name = key[len(prefix) :]
        if not name.endswith(UPDATE_SUFFIX) or "/" in name:
            log.warning("ignoring %s: not an update object", key)
            continue
        client = name.removesuffix(UPDATE_SUFFIX)
        try:
            check_client_id(client)
            with _open_retrying(store, key, client, layout) as upd:
                meta = upd.meta
                # The key decides identity (one object per key): an object claiming to be another client is an
                # impostor and only it is rejected; the client it names keeps its own update.
                if meta.client != client:
                    raise UpdateError(client, f"object is filed as client {client!r} but its metadata names "
                                              f"{meta.client!r}")
                if spec.cohort is not None and client not in spec.cohort:
                    raise UpdateError(client, "unknown client: not in this round's cohort")
                signer = _verified_signer(registry, client, upd) if registry is not None else None
                check_meta(spec, digest, client, meta)
                accepted[client] = ClientEntry(client=client, key=key, examples=meta.examples,
                                               header_sha256=upd.sha256, size=upd.object_size,
                                               coverage=_checked_coverage(client, layout, meta), signer=signer,
                                               compact=meta.compact, encoding=meta.encoding, runs=_few_runs(upd))
        except UpdateError as exc:
            if policy == "fail":
                raise RoundError(str(exc)) from exc
            log.warning("%s", exc)
            rejected[exc.client] = exc.reason
    manifest = RoundManifest(round=r, spec=spec, clients=[accepted[c] for c in sorted(accepted)], rejected=rejected)
    assign_weights(manifest, weighting, server_weights)
    check_enough(manifest)
    return manifest


def _registry_for(store: Store, spec: RoundSpec) -> KeyRegistry:
    """The store's key registry, once the round's digest is found fit to back signatures."""
    if not digests.algorithm(spec.digest).cryptographic:
        raise RoundError(f"round {spec.round} requires signatures but its chunk digest is {spec.digest}, which "
                         "authenticates nothing (a signature over xxh3 digests does not cover the data); open the "
                         "round with digest 'blake3' or 'sha256'")
    from gradshard.security.registry import KeyRegistry  # cryptography loads only for signed rounds

    return KeyRegistry(store)


def _verified_signer(registry: KeyRegistry, client: str, upd: ClientReader) -> str:
    """The fingerprint of the registered key whose signature over ``upd`` verifies; :class:`UpdateError` with the
    reason otherwise."""
    from gradshard.security.signing import verify_signed_update

    try:
        return verify_signed_update(registry, client, upd.meta, upd.header_digest)
    except SecurityError as exc:
        raise UpdateError(client, str(exc)) from None


def _open_retrying(store: Store, key: str, client: str, layout: ModelLayout,
                   attempts: int = 3) -> ClientReader:
    """Open an update, retrying store errors (a transient error says nothing about the update: it must neither
    reject the client nor escape as a traceback); content errors (UpdateError) are raised at once."""
    for attempt in range(1, attempts + 1):
        try:
            return open_client_update(store, key, client, layout)
        except UnsafeObjectError:
            raise
        except ObjectNotFoundError:
            raise UpdateError(client, f"object {key} disappeared while the round was validated") from None
        except StoreError as exc:
            if attempt == attempts:
                raise RoundError(f"reading the header of client {client!r} ({key}) failed {attempts} times; "
                                 f"last: {exc}; the round was not aggregated, retry it") from exc
            log.warning("reading %s failed (%s); retrying (%d/%d)", key, exc, attempt, attempts)
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


def _few_runs(upd: ClientReader) -> tuple[tuple[int, int, int], ...] | None:
    """A full-size update's byte runs, when few enough to travel in the manifest."""
    if isinstance(upd, UpdateReader) and len(upd.runs) <= MAX_MANIFEST_RUNS:
        return upd.runs
    return None


def _checked_coverage(client: str, layout: ModelLayout, meta: UpdateMeta) -> dict[str, tuple[int, ...]] | None:
    """The update's coverage, validated against the round's layout (a coverage of everything is no coverage)."""
    if meta.coverage is None:
        return None
    try:
        coverage = CoverageMap(layout, meta.coverage)
    except GradshardError as exc:
        raise UpdateError(client, f"bad coverage: {exc}") from None
    if coverage.full:
        return None
    return {name: tuple(extent) for name, extent in coverage.extents.items()}


def check_enough(manifest: RoundManifest) -> None:
    if len(manifest.clients) < manifest.spec.min_clients:
        raise RoundError(f"round {manifest.round} has {len(manifest.clients)} valid updates, needs at least "
                         f"{manifest.spec.min_clients}; rejected: {manifest.rejected}")
