"""Model layouts defined in code: the exact ``state_dict()`` names, shapes and order of well-known models.

They let benchmarks and tests size shards for real models (ResNet-18, VGG-16, GPT-2) without importing
torch or downloading weights. Names follow torchvision / HuggingFace conventions so a layout built here equals
``ModelLayout.from_state_dict(model.state_dict())`` of the real model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise

from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.errors import LayoutError

_F32 = "float32"

# HuggingFace GPT-2 sizes: name -> (n_layer, n_embd).
_GPT2_SIZES: dict[str, tuple[int, int]] = {
    "small": (12, 768),
    "medium": (24, 1024),
    "large": (36, 1280),
    "xl": (48, 1600),
}
_GPT2_VOCAB = 50257
_GPT2_POSITIONS = 1024

# torchvision vgg16 ("D" config): output channels per conv, "M" for a max-pool (which has no parameters).
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


# --- building blocks ------------------------------------------------------------------------------
def _conv(name: str, out_ch: int, in_ch: int, k: int, *, bias: bool = False) -> Iterator[TensorSpec]:
    """A ``nn.Conv2d``: weight ``(out, in, k, k)`` and, if it has one, the bias."""
    yield TensorSpec(f"{name}.weight", (out_ch, in_ch, k, k), _F32)
    if bias:
        yield TensorSpec(f"{name}.bias", (out_ch,), _F32)


def _batchnorm(name: str, ch: int) -> Iterator[TensorSpec]:
    """A ``nn.BatchNorm2d``: affine params, float running stats, the int64 step counter (a kept buffer)."""
    for field in ("weight", "bias", "running_mean", "running_var"):
        yield TensorSpec(f"{name}.{field}", (ch,), _F32)
    yield TensorSpec(f"{name}.num_batches_tracked", (), "int64")


def _linear(name: str, out_f: int, in_f: int) -> Iterator[TensorSpec]:
    """A ``nn.Linear``: weight ``(out, in)`` then bias ``(out,)``."""
    yield TensorSpec(f"{name}.weight", (out_f, in_f), _F32)
    yield TensorSpec(f"{name}.bias", (out_f,), _F32)


def _layernorm(name: str, dim: int) -> Iterator[TensorSpec]:
    """A ``nn.LayerNorm``: weight and bias of ``(dim,)``."""
    yield TensorSpec(f"{name}.weight", (dim,), _F32)
    yield TensorSpec(f"{name}.bias", (dim,), _F32)


def _conv1d(name: str, in_f: int, out_f: int) -> Iterator[TensorSpec]:
    """A HuggingFace ``Conv1D``: a linear layer stored transposed, weight ``(in, out)``, bias ``(out,)``."""
    yield TensorSpec(f"{name}.weight", (in_f, out_f), _F32)
    yield TensorSpec(f"{name}.bias", (out_f,), _F32)


# --- ResNet-18 ------------------------------------------------------------------------------------
def _basic_block(name: str, in_ch: int, out_ch: int, *, downsample: bool) -> Iterator[TensorSpec]:
    """A torchvision ``BasicBlock``: two 3x3 conv+BN pairs, a 1x1 conv+BN shortcut if the shape changes."""
    yield from _conv(f"{name}.conv1", out_ch, in_ch, 3)
    yield from _batchnorm(f"{name}.bn1", out_ch)
    yield from _conv(f"{name}.conv2", out_ch, out_ch, 3)
    yield from _batchnorm(f"{name}.bn2", out_ch)
    if downsample:
        yield from _conv(f"{name}.downsample.0", out_ch, in_ch, 1)
        yield from _batchnorm(f"{name}.downsample.1", out_ch)


def resnet18_cifar(*, num_classes: int = 10) -> ModelLayout:
    """torchvision ResNet-18 with the CIFAR stem (3x3 stride-1 conv1, no max-pool).

    11,173,962 trainable parameters for 10 classes, plus BN running stats and 20 ``num_batches_tracked``.
    """
    specs = [*_conv("conv1", 64, 3, 3), *_batchnorm("bn1", 64)]
    in_ch = 64
    for layer, out_ch in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            downsample = block == 0 and out_ch != in_ch
            specs.extend(_basic_block(f"layer{layer}.{block}", in_ch, out_ch, downsample=downsample))
            in_ch = out_ch
    specs.extend(_linear("fc", num_classes, 512))
    return ModelLayout(specs)


# --- VGG-16 ---------------------------------------------------------------------------------------
def vgg16(*, num_classes: int = 10) -> ModelLayout:
    """torchvision VGG-16 without BatchNorm (13 convs with bias, 3 linear layers).

    134,301,514 parameters for 10 classes (138,357,544 for torchvision's 1000).
    """
    specs: list[TensorSpec] = []
    in_ch, idx = 3, 0
    for item in _VGG16_CFG:
        if isinstance(item, str):  # max-pool: one Sequential slot, no parameters
            idx += 1
            continue
        specs.extend(_conv(f"features.{idx}", item, in_ch, 3, bias=True))
        in_ch, idx = item, idx + 2  # conv then ReLU
    specs.extend(_linear("classifier.0", 4096, 512 * 7 * 7))
    specs.extend(_linear("classifier.3", 4096, 4096))
    specs.extend(_linear("classifier.6", num_classes, 4096))
    return ModelLayout(specs)


# --- GPT-2 ----------------------------------------------------------------------------------------
def _gpt2_block(name: str, d: int) -> Iterator[TensorSpec]:
    """One HuggingFace ``GPT2Block``: ln_1, attention (c_attn, c_proj), ln_2, MLP (c_fc, c_proj)."""
    yield from _layernorm(f"{name}.ln_1", d)
    yield from _conv1d(f"{name}.attn.c_attn", d, 3 * d)
    yield from _conv1d(f"{name}.attn.c_proj", d, d)
    yield from _layernorm(f"{name}.ln_2", d)
    yield from _conv1d(f"{name}.mlp.c_fc", d, 4 * d)
    yield from _conv1d(f"{name}.mlp.c_proj", 4 * d, d)


def gpt2(*, size: str = "large") -> ModelLayout:
    """HuggingFace ``GPT2Model`` (no tied lm_head) of size small/medium/large/xl.

    Parameters: small 124,439,808; medium 354,823,168; large 774,030,080; xl 1,557,611,200.
    """
    try:
        n_layer, d = _GPT2_SIZES[size]
    except KeyError:
        raise LayoutError(f"unknown GPT-2 size {size!r}; known: {sorted(_GPT2_SIZES)}") from None
    specs = [
        TensorSpec("wte.weight", (_GPT2_VOCAB, d), _F32),
        TensorSpec("wpe.weight", (_GPT2_POSITIONS, d), _F32),
    ]
    for i in range(n_layer):
        specs.extend(_gpt2_block(f"h.{i}", d))
    specs.extend(_layernorm("ln_f", d))
    return ModelLayout(specs)


# --- small and synthetic models -------------------------------------------------------------------
def mlp(*, sizes: Sequence[int] = (64, 128, 10)) -> ModelLayout:
    """A multi-layer perceptron as a ``ModuleList`` of ``nn.Linear`` named ``layers.{i}``.

    The default (64-128-10, 9,610 parameters) fits sklearn's digits data set, for quick real-data tests.
    """
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise LayoutError(f"an MLP needs at least two positive layer sizes, got {tuple(sizes)}")
    specs: list[TensorSpec] = []
    for i, (in_f, out_f) in enumerate(pairwise(sizes)):
        specs.extend(_linear(f"layers.{i}", out_f, in_f))
    return ModelLayout(specs)


def synthetic(numel: int, *, tensor_elems: int = 1 << 24, dtype: str = "float32") -> ModelLayout:
    """A flat model of exactly ``numel`` elements in tensors ``t00000, t00001, ...`` of ``tensor_elems`` each.

    The last tensor holds the rest. Sizes benchmarks at any scale (billions of elements) from specs alone.
    """
    if numel < 1:
        raise LayoutError(f"a synthetic model needs at least one element, got numel={numel}")
    if tensor_elems < 1:
        raise LayoutError(f"tensor_elems must be at least 1, got {tensor_elems}")
    count = -(-numel // tensor_elems)
    return ModelLayout(
        TensorSpec(f"t{i:05d}", (min(tensor_elems, numel - i * tensor_elems),), dtype) for i in range(count)
    )


# --- registry -------------------------------------------------------------------------------------
LAYOUTS: dict[str, Callable[[], ModelLayout]] = {
    "mlp": mlp,
    "resnet18": resnet18_cifar,
    "vgg16": vgg16,
    "gpt2-small": lambda: gpt2(size="small"),
    "gpt2-medium": lambda: gpt2(size="medium"),
    "gpt2-large": lambda: gpt2(size="large"),
    "gpt2-xl": lambda: gpt2(size="xl"),
}
_SYNTHETIC_PREFIX = "synthetic-"
# A name is untrusted input (a CLI option): at most as many tensors as an update's header may hold (100,000).
MAX_SYNTHETIC_NUMEL = 100_000 << 24


def _parse_synthetic(name: str) -> ModelLayout:
    """``synthetic-<N>``, N an int or float literal (``1000000``, ``2.5e9``) -> ``synthetic(int(N))``."""
    text = name.removeprefix(_SYNTHETIC_PREFIX)
    try:
        numel = int(float(text))
    except (ValueError, OverflowError):
        raise LayoutError(
            f"bad synthetic model size {text!r} in {name!r}; use e.g. 'synthetic-2.5e9'"
        ) from None
    if numel > MAX_SYNTHETIC_NUMEL:
        raise LayoutError(f"synthetic model size {text!r} in {name!r} is over the {MAX_SYNTHETIC_NUMEL:.3g} elements "
                          "an update can hold")
    return synthetic(numel)


def get_layout(name: str) -> ModelLayout:
    """The layout registered as ``name`` in :data:`LAYOUTS`, or a ``synthetic-<N>`` model of N elements."""
    if name.startswith(_SYNTHETIC_PREFIX):
        return _parse_synthetic(name)
    try:
        factory = LAYOUTS[name]
    except KeyError:
        known = [*sorted(LAYOUTS), f"{_SYNTHETIC_PREFIX}<N>"]
        raise LayoutError(f"unknown model {name!r}; known: {', '.join(known)}") from None
    return factory()
