"""Tests of the in-code model zoo: exact torchvision / HuggingFace parameter counts, names, registry."""

from __future__ import annotations

import pytest

from gradshard.core.layout import ModelLayout
from gradshard.core.zoo import LAYOUTS, get_layout, gpt2, mlp, resnet18_cifar, synthetic, vgg16
from gradshard.errors import LayoutError

_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _param_count(layout: ModelLayout) -> int:
    """Trainable parameters: every tensor except BatchNorm buffers (what ``model.parameters()`` counts)."""
    return sum(t.numel for t in layout if not t.name.endswith(_BUFFER_SUFFIXES))


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        (resnet18_cifar(), 11_173_962),
        (vgg16(), 134_301_514),
        (vgg16(num_classes=1000), 138_357_544),
        (gpt2(size="small"), 124_439_808),
        (gpt2(size="large"), 774_030_080),
        (mlp(), 64 * 128 + 128 + 128 * 10 + 10),
    ],
    ids=["resnet18", "vgg16", "vgg16-1000", "gpt2-small", "gpt2-large", "mlp"],
)
def test_parameter_counts_match_reference_models(layout: ModelLayout, expected: int) -> None:
    # Prepare / Execute
    count = _param_count(layout)

    # Assert
    assert count == expected


def test_resnet18_stem_and_head_follow_the_cifar_variant() -> None:
    # Prepare / Execute
    layout = resnet18_cifar(num_classes=100)
    names = [t.name for t in layout]

    # Assert
    assert layout.slot("conv1.weight").spec.shape == (64, 3, 3, 3)
    assert layout.slot("fc.weight").spec.shape == (100, 512)
    assert layout.slot("layer2.0.downsample.0.weight").spec.shape == (128, 64, 1, 1)
    assert "layer1.0.downsample.0.weight" not in names
    assert not any(n.endswith(".bias") and "conv" in n for n in names)
    assert names[:7] == [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer1.0.conv1.weight",
    ]
    assert names[-2:] == ["fc.weight", "fc.bias"]


def test_resnet18_kept_part_is_exactly_the_batchnorm_counters() -> None:
    # Prepare: bn1 + 2 BNs in each of 8 basic blocks + 3 downsample BNs (layers 2-4)
    bn_layers = 1 + 8 * 2 + 3
    layout = resnet18_cifar()

    # Execute
    kept = layout.kept()
    aggregated = layout.aggregated()

    # Assert
    assert bn_layers == 20
    assert len(kept) == bn_layers
    assert all(t.name.endswith(".num_batches_tracked") and t.shape == () and t.dtype == "int64" for t in kept)
    assert not any(t.name.endswith("num_batches_tracked") for t in aggregated)
    assert sum(t.name.endswith(".running_mean") for t in aggregated) == bn_layers
    assert sum(t.name.endswith(".running_var") for t in aggregated) == bn_layers
    assert len(aggregated) + len(kept) == len(layout)


def test_vgg16_uses_torchvision_feature_indices() -> None:
    # Prepare
    conv_indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]

    # Execute
    layout = vgg16()
    names = [t.name for t in layout]

    # Assert
    assert names[: 2 * len(conv_indices)] == [
        f"features.{i}.{f}" for i in conv_indices for f in ("weight", "bias")
    ]
    assert layout.slot("classifier.0.weight").spec.shape == (4096, 25088)
    assert layout.slot("classifier.6.weight").spec.shape == (10, 4096)
    assert layout.kept().numel == 0


def test_gpt2_large_shapes_and_float32_bytes() -> None:
    # Prepare / Execute
    layout = gpt2(size="large")

    # Assert
    assert len(layout) == 2 + 36 * 12 + 2
    assert layout.slot("wte.weight").spec.shape == (50257, 1280)
    assert layout.slot("h.35.attn.c_attn.weight").spec.shape == (1280, 3840)
    assert layout.slot("h.0.mlp.c_proj.weight").spec.shape == (5120, 1280)
    assert layout.aggregated("float32").nbytes == 3_096_120_320
    assert [t.name for t in layout][-2:] == ["ln_f.weight", "ln_f.bias"]


def test_gpt2_unknown_size_is_rejected() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(LayoutError, match="huge"):
        gpt2(size="huge")


def test_every_registered_layout_has_unique_names() -> None:
    # Prepare / Execute
    layouts = {name: factory() for name, factory in LAYOUTS.items()}

    # Assert
    assert {"mlp", "resnet18", "vgg16", "gpt2-small", "gpt2-large"} <= set(layouts)
    for layout in layouts.values():
        names = [t.name for t in layout]
        assert len(names) == len(set(names))


def test_get_layout_returns_the_registered_model() -> None:
    # Prepare / Execute
    layout = get_layout("resnet18")

    # Assert
    assert layout == resnet18_cifar()


def test_get_layout_unknown_name_lists_known_names() -> None:
    # Prepare / Execute
    with pytest.raises(LayoutError) as info:
        get_layout("resnet50")

    # Assert
    message = str(info.value)
    assert "resnet50" in message
    for known in ("mlp", "resnet18", "vgg16", "gpt2-small", "gpt2-large", "synthetic-<N>"):
        assert known in message


def test_synthetic_splits_with_a_remainder() -> None:
    # Prepare / Execute
    layout = synthetic(10, tensor_elems=4, dtype="float16")

    # Assert
    assert [t.name for t in layout] == ["t00000", "t00001", "t00002"]
    assert [t.shape for t in layout] == [(4,), (4,), (2,)]
    assert layout.numel == 10
    assert layout.dtypes == {"float16"}


def test_synthetic_exact_multiple_has_no_short_tensor() -> None:
    # Prepare / Execute
    layout = synthetic(12, tensor_elems=4)

    # Assert
    assert [t.shape for t in layout] == [(4,), (4,), (4,)]


@pytest.mark.parametrize(
    ("name", "numel"),
    [("synthetic-1000000", 1_000_000), ("synthetic-2.5e9", 2_500_000_000), ("synthetic-1", 1)],
)
def test_get_layout_parses_synthetic_sizes(name: str, numel: int) -> None:
    # Prepare / Execute
    layout = get_layout(name)

    # Assert
    assert layout.numel == numel
    assert all(t.numel <= 1 << 24 for t in layout)


@pytest.mark.parametrize(
    ("numel", "tensor_elems"), [(0, 4), (-5, 4), (10, 0)], ids=["zero", "negative", "elems"]
)
def test_synthetic_rejects_bad_sizes(numel: int, tensor_elems: int) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(LayoutError):
        synthetic(numel, tensor_elems=tensor_elems)


@pytest.mark.parametrize("name", ["synthetic-", "synthetic-lots", "synthetic-0", "synthetic-inf"])
def test_get_layout_rejects_bad_synthetic_names(name: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(LayoutError):
        get_layout(name)


def test_mlp_rejects_too_few_sizes() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(LayoutError):
        mlp(sizes=(64,))
