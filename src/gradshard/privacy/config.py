"""The privacy settings of a run: client DP-SGD and central DP, as validated models (a ``[privacy]`` TOML table)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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

    The accountant's sampling amplification follows the run's ``sampling`` (``fixed``: per_round of the clients
    without replacement; ``poisson``: each client with probability per_round / clients)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    clip: float = Field(gt=0, allow_inf_nan=False)
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


class CentralDPRound(BaseModel):
    """Central DP for one aggregation (``AggregateConfig.central_dp``; ``gradshard aggregate --dp-*``).

    ``expected_clients`` is the mean's denominator (the expected cohort: sensitivity ``clip / expected_clients``
    holds only for a fixed denominator; None: the number of accepted clients). The release's amplification comes
    from ``sampler``: ``poisson`` with ``sample_rate`` (default expected_clients / population), ``fixed``
    (expected_clients of population without replacement) or ``none`` (every member, every round).
    ``noise_multiplier`` 0 clips without noise: no privacy (ε = ∞), refused when ``max_epsilon`` is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip: float = Field(gt=0, allow_inf_nan=False)
    noise_multiplier: float = Field(ge=0, allow_inf_nan=False)
    sampler: Literal["poisson", "fixed", "none"] = "none"
    population: int | None = Field(default=None, ge=1)
    expected_clients: int | None = Field(default=None, ge=1)
    sample_rate: float | None = Field(default=None, gt=0, le=1)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_epsilon: float | None = Field(default=None, gt=0)
    key_file: str = ""

    @model_validator(mode="after")
    def _sampler_needs(self) -> CentralDPRound:
        if self.sampler == "fixed" and (self.population is None or self.expected_clients is None
                                        or self.expected_clients > self.population):
            raise ValueError("sampler 'fixed' needs population and expected_clients <= population")
        if self.sampler == "poisson" and self.sample_rate is None and (self.population is None
                                                                        or self.expected_clients is None):
            raise ValueError("sampler 'poisson' needs sample_rate, or population and expected_clients")
        return self

    def rate(self) -> float:
        if self.sample_rate is not None:
            return self.sample_rate
        assert self.population is not None and self.expected_clients is not None
        return min(1.0, self.expected_clients / self.population)
