"""Every key gradshard writes in a store, in one place.

Aggregation (``<r>`` is the zero-padded round number)::

    rounds/<r>/round.json                    RoundSpec: expected layout, chunk size, base model, cohort
    rounds/<r>/updates/<client>.safetensors  one update per client
    rounds/<r>/manifest.json                 the validated, canonically ordered clients (and the rejected ones)
    rounds/<r>/aggregate.safetensors         the aggregated update (same format as an update)
    rounds/<r>/reports.json                  the invocation reports of the aggregation
    rounds/<r>/client_reports.json           training runs: the invocation reports of the client functions
    rounds/<r>/server_reports.json           training runs: the invocation reports of the server step
    rounds/<r>/flat_check.json               the demo's bit-identity check of the round against a flat recomputation
    rounds/<r>/partials/<run>/<node>.safetensors   scratch partial sums of tree topologies

Training runs add ``run/config.json``, ``data/``, ``models/<r>.safetensors``, ``server/<r>/<slot>.safetensors``
and ``metrics/<r>.json``.
"""

from __future__ import annotations

import re

from gradshard.errors import UpdateError

UPDATE_SUFFIX = ".safetensors"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def check_client_id(client: str) -> str:
    """A client id is a key component: 1-128 characters of letters, digits and ``_.-``, not starting with '.'."""
    if not _CLIENT_ID.match(client) or client.startswith("."):
        raise UpdateError(client, "client ids are 1-128 characters of letters, digits and _.-, not starting with '.'")
    return client


# --- rounds ------------------------------------------------------------------------------------------------------
def round_prefix(r: int) -> str:
    return f"rounds/{r:06d}"


def spec_key(r: int) -> str:
    return f"{round_prefix(r)}/round.json"


def updates_prefix(r: int) -> str:
    return f"{round_prefix(r)}/updates/"


def update_key(r: int, client: str) -> str:
    return f"{updates_prefix(r)}{check_client_id(client)}{UPDATE_SUFFIX}"


def manifest_key(r: int) -> str:
    return f"{round_prefix(r)}/manifest.json"


def aggregate_key(r: int) -> str:
    return f"{round_prefix(r)}/aggregate.safetensors"


def reports_key(r: int) -> str:
    return f"{round_prefix(r)}/reports.json"


def root_update_key(r: int) -> str:
    """FLTrust: the server's own update of round ``r``, trained on its root data set (not a client's)."""
    return f"{round_prefix(r)}/root.safetensors"


def trust_key(r: int) -> str:
    """FLTrust: the round's record of cosines, trust scores and norms."""
    return f"{round_prefix(r)}/trust.json"


def secagg_prefix(r: int) -> str:
    """Secure aggregation's records of round ``r``: the key directory, relayed shares, revealed shares."""
    return f"{round_prefix(r)}/secagg"


def selection_key(r: int) -> str:
    """The selection phase's record (Krum, Multi-Krum, Bulyan): the distance matrix, scores, the selected."""
    return f"{round_prefix(r)}/selection.json"


def client_reports_key(r: int) -> str:
    return f"{round_prefix(r)}/client_reports.json"


def server_reports_key(r: int) -> str:
    return f"{round_prefix(r)}/server_reports.json"


def plugin_key(r: int) -> str:
    """A round plugin's decisions for round ``r`` (:mod:`gradshard.fl.plugin`)."""
    return f"{round_prefix(r)}/plugin.json"


def flat_check_key(r: int) -> str:
    return f"{round_prefix(r)}/flat_check.json"


def partials_prefix(r: int, upload_id: str) -> str:
    """Partials live under the round, per run (the output's upload id), so a rerun never reads a stale partial."""
    return f"{round_prefix(r)}/partials/{upload_id[:12]}/"


def partial_key(r: int, upload_id: str, name: str) -> str:
    return f"{partials_prefix(r, upload_id)}{name}.safetensors"


# --- training runs -----------------------------------------------------------------------------------------------
CONFIG_KEY = "run/config.json"
KEPT_KEY = "models/kept.safetensors"
TEST_DATA_KEY = "data/test.safetensors"
ROOT_DATA_KEY = "data/root.safetensors"  # FLTrust: the server's own small, clean training set


def model_key(r: int) -> str:
    return f"models/{r:06d}.safetensors"


def state_key(r: int, slot: str) -> str:
    return f"server/{r:06d}/{slot}.safetensors"


def metrics_key(r: int) -> str:
    return f"metrics/{r:06d}.json"


def client_data_key(client: str) -> str:
    return f"data/clients/{client}.safetensors"


def residual_prefix(client: str) -> str:
    """Error feedback: where ``client``'s residuals are kept (one per round it uploaded a top-k update in)."""
    return f"clients/{check_client_id(client)}/residual/"


def residual_key(r: int, client: str) -> str:
    """Error feedback: what ``client``'s top-k update of round ``r`` left out (its update plus the residual it carried
    in, less what it sent), carried into the next round it trains in if round ``r`` aggregated its update."""
    return f"{residual_prefix(client)}{r:06d}.safetensors"


_ROUND_KEY = re.compile(r"^rounds/(\d+)/")


def round_of_key(key: str) -> int | None:
    """The round a ``rounds/<r>/...`` key belongs to (None for any other key): what invocation tokens scope to."""
    match = _ROUND_KEY.match(key)
    return int(match.group(1)) if match else None
