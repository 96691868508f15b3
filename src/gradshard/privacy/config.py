"""The privacy settings of a run: client DP-SGD and central DP, as validated models (a ``[privacy]`` TOML table)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Sampler = Literal["poisson", "fixed"]


class ClientDP(BaseModel):
    """DP-SGD inside every client (Opacus): per-example gradients clipped to ``max_grad_norm``, Gaussian noise of
    std ``noise_multiplier · max_grad_norm`` added to every batch's summed gradient, batches drawn by Poisson
    sampling (each example with probability batch_size / examples). Each client reports its (ε, δ) per round; the
    driver composes each client's rounds with the accountant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    max_grad_norm: float = Field(gt=0, allow_inf_nan=False)
    poisson: bool = Field(default=True, description="Poisson batch sampling (what the accountant assumes)")
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_epsilon: float | None = Field(default=None, gt=0, description="a client whose composed ε would exceed "
                                                                       "this stops taking part")


class CentralDP(BaseModel):
    """Central DP at the server: each client's update clipped to L2 norm ``clip``, then Gaussian noise of std
    ``noise_multiplier · clip / expected clients`` added to the (uniform) mean, element by element.

    ``sampler`` is how clients are drawn each round (the accountant's amplification): ``poisson`` (each of the
    ``population`` with probability per_round / population) or ``fixed`` (per_round of the population without
    replacement)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    clip: float = Field(gt=0, allow_inf_nan=False)
    sampler: Sampler = "poisson"
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_epsilon: float | None = Field(default=None, gt=0, description="a round whose release would take ε past "
                                                                       "this is refused before noise is drawn")
    key_file: str = Field(default="", description="file holding the secret noise key (created if missing); empty: "
                                                  "a fresh key for this process")


class PrivacyConfig(BaseModel):
    """``[privacy.client]`` and/or ``[privacy.central]``; neither: no differential privacy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    client: ClientDP | None = None
    central: CentralDP | None = None
