"""Client DP-SGD with Opacus: a task's model trained privately inside the client function.

Every step of local training is one application of the sampled Gaussian mechanism (Opacus 1.6.0's
``PrivacyEngine.make_private``):

- **sampling**: a batch is a Poisson sample of the client's examples — each example taken independently with
  probability q = 1 / ⌈n / batch_size⌉ ≈ batch_size / n (Opacus's ``DPDataLoader``; batches vary in size, and may be
  empty); ⌈n / batch_size⌉ batches make an epoch;
- **clipping**: every example's gradient is clipped to L2 norm ``max_grad_norm`` before the batch's gradients are
  summed — per-example clipping, i.e. FedLess's / TF-Privacy's "microbatches" with one example per microbatch
  (the strongest setting: no microbatch averages examples before clipping);
- **noise**: Gaussian noise of std ``noise_multiplier · max_grad_norm`` is added to the summed clipped gradients,
  which are then divided by the expected batch size and handed to the task's optimizer (SGD by default).

The round's release is ``Release(noise_multiplier=z, sampler="poisson", sample_rate=q, steps=epochs · batches)``,
read from what Opacus's own accountant recorded during training, and its ε at δ is computed with
:func:`gradshard.privacy.accountant.epsilon` (dp-accounting's RDP accountant; Opacus's RDP accountant gives the same
value to ~1e-3 relative, different order grids). The driver composes a client's releases across rounds
(:mod:`gradshard.privacy.client_ledger`).

Deterministic given the client's seed: the Poisson sampler and the noise each draw from a ``torch.Generator`` seeded
from it (``secure_mode=False``), so a retried client writes the same update. That noise is torch's Mersenne Twister,
not a CSPRNG: an adversary who knows the seed can subtract it. Opacus's ``secure_mode`` (a CSPRNG from
``torchcsprng``) would give up that determinism and is not offered here.

Refused, with a :class:`~gradshard.fl.task.TaskError` naming the fix: a task with its own ``train`` (its loop is not
ours to privatise), FedProx (``mu > 0``: Opacus's optimizer replaces the gradient with the noised per-example sum,
so the proximal term's gradient would be dropped silently) and models Opacus cannot compute per-example gradients
for (BatchNorm mixes examples in a batch). BatchNorm is refused rather than replaced with
``ModuleValidator.fix`` inside the client because the fix changes the model's tensors (GroupNorm has no running
statistics), so the client's update would no longer match the global model's layout: fix the task's ``model()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradshard.extras import require_extra
from gradshard.fl.task import Scores, Task, TaskError, TrainContext
from gradshard.privacy.accountant import Release, epsilon
from gradshard.privacy.config import ClientDP

if TYPE_CHECKING:
    from torch import nn

    from gradshard.fl.data import Dataset


@dataclass(frozen=True)
class PrivateFit:
    """What one client's private local training did: its scores, its release and the release's ε at ``delta``."""

    scores: Scores
    release: Release
    epsilon: float
    delta: float


@contextlib.contextmanager
def quiet_accounting() -> Iterator[None]:
    """dp-accounting logs (through absl) a warning for every small RDP order whose series does not converge and is
    left out of the minimum; harmless, and one per order, client and round. Silenced while computing ε."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def release_epsilon(releases: Sequence[Release], delta: float) -> float:
    """:func:`gradshard.privacy.accountant.epsilon` of ``releases`` at ``delta``, without the accountant's log noise."""
    with quiet_accounting():
        return epsilon(releases, delta)


def noise_seed(seed: int) -> int:
    """The seed of the noise generator, derived from the client's seed (separate from the sampler's stream)."""
    return int.from_bytes(hashlib.sha256(f"dpsgd-noise/{seed}".encode()).digest()[:8], "little")


def check_private(task: Task, model: nn.Module, *, mu: float = 0.0) -> None:
    """Raise :class:`TaskError` unless ``task`` and ``model`` can be trained with DP-SGD (see the module docstring)."""
    require_extra("privacy", "client DP-SGD")
    if task.train is not None:
        raise TaskError(f"task {task.name!r} has its own train(); client DP-SGD privatises only the default training "
                        "loop (per-example clipping and noise happen inside it). Drop train= from the task (give "
                        "loss= and optimizer= instead), or run without [privacy.client]")
    if mu > 0:
        raise TaskError(f"task {task.name!r}: FedProx (mu = {mu}) cannot be combined with client DP-SGD: Opacus's "
                        "optimizer replaces the gradient with the noised per-example sum, which would drop the "
                        "proximal term; set mu = 0")
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        found = "; ".join(sorted({str(e) for e in errors}))[:600]
        raise TaskError(f"task {task.name!r}: Opacus cannot train this model with per-example gradients: {found}. "
                        "Fix the task's model(): replace BatchNorm with GroupNorm (e.g. nn.GroupNorm(min(32, C), C)), "
                        "or return opacus.validators.ModuleValidator.fix(model) from it")


def train_private(task: Task, model: nn.Module, data: Dataset, context: TrainContext, dp: ClientDP) -> PrivateFit:
    """``context.epochs`` epochs of DP-SGD on ``data`` (the model is trained in place); mean loss and accuracy over
    the non-empty batches, the round's :class:`Release` and its ε at ``dp.delta``."""
    check_private(task, model, mu=context.mu)
    if len(data) == 0:
        raise TaskError(f"task {task.name!r}: client {context.client} has no examples to train on privately")
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    params = list(model.parameters())
    if task.optimizer is not None:
        opt = task.optimizer(params, context)
    else:
        opt = torch.optim.SGD(params, lr=context.lr, momentum=context.momentum)
    sampling = torch.Generator().manual_seed(context.seed)
    noise = torch.Generator().manual_seed(noise_seed(context.seed))
    loader = DataLoader(TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y)),
                        batch_size=context.batch_size, shuffle=not dp.poisson, generator=sampling)
    with warnings.catch_warnings():
        # The seeded generators are the point (see the module docstring); the warning would repeat every client.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        private_model, private_opt, private_loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm, poisson_sampling=dp.poisson, noise_generator=noise)
    private_model.train()
    losses, correct, seen = [], 0, 0
    for _ in range(context.epochs):
        for xb, yb in private_loader:
            private_opt.zero_grad()
            logits = private_model(xb)
            loss = task.compute_loss(logits, yb)
            with warnings.catch_warnings():  # Opacus's hooks on a first layer whose input needs no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()  # type: ignore[no-untyped-call]
            private_opt.step()  # an empty Poisson batch still takes a step: noise only
            if len(yb):
                losses.append(float(loss.detach()))
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(yb)
    release = _release(engine.accountant.history, task.name)
    return PrivateFit(Scores(sum(losses) / max(1, len(losses)), correct / max(1, seen)), release,
                      release_epsilon([release], dp.delta), dp.delta)


def _release(history: list[tuple[float, float, int]], task: str) -> Release:
    """The one release Opacus's accountant recorded: (noise multiplier, sample rate, steps)."""
    if len(history) != 1:
        raise TaskError(f"task {task!r}: expected one (noise multiplier, sample rate) setting in Opacus's accountant "
                        f"history, got {history!r}")
    z, q, steps = history[0]
    return Release(noise_multiplier=z, sampler="poisson", sample_rate=q, steps=steps)
