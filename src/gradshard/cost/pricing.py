"""Cloud list prices as data: function compute and invocations, object-store operations, and platform limits.

Every sheet names its sources and the date on which its figures were the providers' public list prices (first
pricing tier, no free tier, no discounts). Prices change: check the sources before relying on a figure. A sheet of
your own is a JSON file with the same fields (:func:`load_price_sheet`).

Units: memory in MB of 2^20 bytes and GB of 1024 MB, as AWS Lambda bills ("GB-second") and as the GradsSharding
paper reports its function sizes.
"""

from __future__ import annotations

import math
from datetime import date
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from gradshard.errors import PlanError


class MemoryTier(BaseModel):
    """A fixed memory size a platform offers, with the CPU clock it comes with (billed per GHz-second)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_mb: int = Field(gt=0)
    cpu_ghz: float = Field(ge=0)


class FunctionPricing(BaseModel):
    """What one function invocation costs and what a function may be: memory range, tiers, time limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gb_second: float = Field(ge=0, description="$ per GB-second of configured memory")
    ghz_second: float = Field(default=0.0, ge=0, description="$ per GHz-second of CPU, where billed apart")
    per_million_requests: float = Field(ge=0, description="$ per million invocations")
    billing_increment_ms: int = Field(gt=0, description="each duration is rounded up to a multiple of this")
    min_memory_mb: int = Field(gt=0)
    max_memory_mb: int = Field(gt=0)
    memory_tiers: tuple[MemoryTier, ...] = Field(
        default=(), description="fixed sizes, billed as the next tier up; empty: any size in 1 MB steps")
    max_duration_s: float = Field(gt=0, description="the platform's per-invocation time limit")


class StoragePricing(BaseModel):
    """Object-store request prices (transfer within the region and storage itself are not priced)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    put_per_1000: float = Field(ge=0, description="$ per 1000 PUT-class requests (PUT, POST, COPY, LIST)")
    get_per_1000: float = Field(ge=0, description="$ per 1000 GET-class requests (GET, ranged GET, HEAD)")


class PriceSheet(BaseModel):
    """One provider's function and object-store prices in one region, with where and when they were read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    provider: str
    region: str
    function_service: str
    storage_service: str
    function: FunctionPricing
    storage: StoragePricing
    as_of: date
    sources: tuple[str, ...]
    notes: str = ""

    def billed_memory_mb(self, memory_mb: float) -> int:
        """The memory a function of ``memory_mb`` is billed for: at least the minimum, the next tier up if tiered."""
        memory = max(self.function.min_memory_mb, math.ceil(memory_mb))
        return self._tier(memory).memory_mb if self.function.memory_tiers else memory

    def billed_seconds(self, duration_s: float) -> float:
        """``duration_s`` rounded up to the billing increment (rounded to a microsecond first, so 57.3 s stays)."""
        step = self.function.billing_increment_ms
        return math.ceil(round(duration_s * 1000 / step, 3)) * step / 1000

    def compute_cost(self, memory_mb: float, duration_s: float) -> float:
        """Dollars for one invocation of ``duration_s`` seconds with ``memory_mb`` configured."""
        billed_mb = self.billed_memory_mb(memory_mb)
        ghz = self._tier(billed_mb).cpu_ghz if self.function.memory_tiers else 0.0
        rate = billed_mb / 1024 * self.function.gb_second + ghz * self.function.ghz_second
        return self.billed_seconds(duration_s) * rate

    def _tier(self, memory_mb: int) -> MemoryTier:
        for tier in self.function.memory_tiers:
            if tier.memory_mb >= memory_mb:
                return tier
        raise PlanError(f"{self.name}: no memory tier holds {memory_mb} MB (largest "
                        f"{self.function.memory_tiers[-1].memory_mb} MB)")


_AWS_SOURCES = ("https://aws.amazon.com/lambda/pricing/", "https://aws.amazon.com/s3/pricing/")
_S3_STANDARD = StoragePricing(put_per_1000=0.005, get_per_1000=0.0004)
_AS_OF = date(2024, 6, 1)


def _lambda(gb_second: float) -> FunctionPricing:
    """AWS Lambda: 128-10,240 MB in 1 MB steps, 1 ms billing, 15 minutes at most, $0.20 per million requests."""
    return FunctionPricing(gb_second=gb_second, per_million_requests=0.20, billing_increment_ms=1, min_memory_mb=128,
                           max_memory_mb=10240, max_duration_s=900.0)


AWS_LAMBDA_X86 = PriceSheet(
    name="aws-lambda-x86", provider="AWS", region="us-east-1", function_service="Lambda (x86_64)",
    storage_service="S3 Standard", as_of=_AS_OF, sources=_AWS_SOURCES,
    function=_lambda(0.0000166667),
    storage=_S3_STANDARD,
    notes="The prices the GradsSharding paper used. Lambda bills configured memory x duration in 1 ms steps.")

AWS_LAMBDA_ARM64 = PriceSheet(
    name="aws-lambda-arm64", provider="AWS", region="us-east-1", function_service="Lambda (arm64, Graviton)",
    storage_service="S3 Standard", as_of=_AS_OF, sources=_AWS_SOURCES,
    function=_lambda(0.0000133334),
    storage=_S3_STANDARD)

GCP_FUNCTIONS_GEN1 = PriceSheet(
    name="gcp-functions-gen1", provider="Google Cloud", region="us-central1 (Tier 1 pricing)",
    function_service="Cloud Functions (1st gen)", storage_service="Cloud Storage Standard", as_of=_AS_OF,
    sources=("https://cloud.google.com/functions/pricing", "https://cloud.google.com/storage/pricing"),
    function=FunctionPricing(
        gb_second=0.0000025, ghz_second=0.0000100, per_million_requests=0.40, billing_increment_ms=100,
        min_memory_mb=128, max_memory_mb=8192, max_duration_s=540.0,
        memory_tiers=tuple(MemoryTier(memory_mb=m, cpu_ghz=g) for m, g in (
            (128, 0.2), (256, 0.4), (512, 0.8), (1024, 1.4), (2048, 2.4), (4096, 4.8), (8192, 4.8)))),
    storage=StoragePricing(put_per_1000=0.005, get_per_1000=0.0004),
    notes="Memory comes in fixed tiers with a CPU clock each; both are billed per 100 ms. Storage: Class A "
          "operations (writes) $0.05 and Class B (reads) $0.004 per 10,000.")

PRICE_SHEETS: dict[str, PriceSheet] = {s.name: s for s in (AWS_LAMBDA_X86, AWS_LAMBDA_ARM64, GCP_FUNCTIONS_GEN1)}
DEFAULT_PRICES = AWS_LAMBDA_X86.name


def load_price_sheet(path: str | Path) -> PriceSheet:
    """A price sheet from a JSON file with the fields of :class:`PriceSheet`."""
    return PriceSheet.model_validate_json(Path(path).read_text())


def price_sheet(name_or_path: str) -> PriceSheet:
    """A built-in sheet by name (see ``PRICE_SHEETS``) or one read from a JSON file."""
    if name_or_path in PRICE_SHEETS:
        return PRICE_SHEETS[name_or_path]
    if Path(name_or_path).is_file():
        return load_price_sheet(name_or_path)
    raise PlanError(f"unknown price sheet {name_or_path!r}: use one of {sorted(PRICE_SHEETS)} or a JSON file")
