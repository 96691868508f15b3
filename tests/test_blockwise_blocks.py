"""Block-wise training's pure pieces (issue 15): splitting a sequential model, stage models that freeze the prefix,
the stage loss, the active range in the flat layout, and the stage schedules with memory-aware assignment."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradshard.blockwise.blocks import (
    StageModel,
    active_range,
    block_parameter_names,
    child_sizes,
    output_module,
    split_sequential,
    stage_loss,
    stage_memory_bytes,
)
from gradshard.blockwise.schedule import assign, pace_rounds, stage_of_round
from gradshard.core.layout import ModelLayout
from gradshard.errors import GradshardError


def cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))


@settings(max_examples=40, deadline=None)
@given(widths=st.lists(st.integers(1, 40), min_size=1, max_size=8), blocks=st.integers(1, 8))
def test_a_split_has_the_asked_blocks_each_with_parameters(widths: list[int], blocks: int) -> None:
    layers: list[nn.Module] = []
    for a, b in zip([3, *widths], widths, strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers)
    if blocks > len(widths):
        with pytest.raises(GradshardError, match="cannot cut"):
            split_sequential(model, blocks)
        return
    split = split_sequential(model, blocks)
    assert split.blocks == blocks and split.bounds[-1] == len(layers)
    for t in range(blocks):
        assert sum(p.numel() for i in split.children(t) for p in model[i].parameters()) > 0


def test_the_blocks_are_contiguous_ranges_of_the_flat_layout_covering_it() -> None:
    model = cnn()
    split = split_sequential(model, 3)
    layout = ModelLayout.from_state_dict(model.state_dict())
    ranges = [active_range(layout, block_parameter_names(model, split, t)) for t in range(3)]
    assert ranges[0][0] == 0 and ranges[-1][1] == layout.numel
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_a_stage_trains_only_its_block_co_adapted_neighbour_and_head() -> None:
    # Prepare
    torch.manual_seed(0)
    model = cnn()
    split = split_sequential(model, [0, 2, 4, 8])
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = output_module(StageModel(model, split, 1, nn.Identity()).features(x), 10)
    stage = StageModel(model, split, 1, head, co_adapt=1)
    optimizer = torch.optim.SGD(stage.parameters(), lr=0.1)

    # Execute: one step of the stage loss
    z, logits = stage(x)
    loss = stage_loss(logits, y, z, x, 10, lambda_x=0.1, lambda_y=0.1)
    loss.backward()
    optimizer.step()

    # Assert: block 1 (children 2, 3) and the last trainable module of block 0 (child 0) changed; block 2 did not
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_the_frozen_prefix_keeps_no_activations_for_backward() -> None:
    model = cnn()
    split = split_sequential(model, [0, 2, 4, 8])
    stage = StageModel(model, split, 2, nn.Sequential(nn.Flatten(), nn.Linear(16 * 64, 10)), co_adapt=0)
    z = stage.features(torch.randn(4, 1, 8, 8))
    prefix_out = stage.frozen[-1](torch.randn(1))  # a ReLU: no graph either way
    assert z.requires_grad and not prefix_out.requires_grad
    small = stage_memory_bytes(model, split, 0, torch.randn(32, 1, 8, 8), 10, co_adapt=0)
    whole = stage_memory_bytes(model, split_sequential(model, [0, 8]), 0, torch.randn(32, 1, 8, 8), 10)
    assert 0 < small < whole


def test_the_output_module_starts_from_the_models_classifier_when_shapes_match() -> None:
    classifier = nn.Linear(16, 10)
    head = output_module(torch.zeros(2, 16, 4, 4), 10, classifier)
    assert torch.equal(head[-1].weight, classifier.weight)
    assert output_module(torch.zeros(2, 8, 4, 4), 10, classifier)[-1].weight.shape == (10, 8)


def test_schedules_round_robin_and_pace() -> None:
    assert [stage_of_round(r, 4, "round-robin", 10) for r in range(9)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert pace_rounds(3, 10) == [4, 3, 3]
    assert [stage_of_round(r, 3, "pace", 10) for r in range(12)] == [0] * 4 + [1] * 3 + [2] * 3 + [2, 2]
    assert [stage_of_round(r, 2, "pace", 4, pace=[1, 3]) for r in range(4)] == [0, 1, 1, 1]
    with pytest.raises(GradshardError, match="at least one round per stage"):
        pace_rounds(4, 3)


def test_memory_tiers_train_different_stages_in_the_same_round() -> None:
    need = [100, 300, 200, 500]
    assigned, idle = assign(3, {"big": 1000, "mid": 350, "small": 150, "tiny": 50}, need)
    assert assigned == {"big": 3, "mid": 2, "small": 0}
    assert "below every stage up to 3" in idle["tiny"]


def test_blocks_are_balanced_by_the_given_sizes() -> None:
    model = cnn()
    # the final linear layer holds 10,250 of the 13,818 parameters: alone it is block 1 (children 5-7)
    assert split_sequential(model, 2).bounds == (0, 5, 8)
    # all the size in the first convolution: it is block 0 on its own
    assert split_sequential(model, 2, [100.0, 0, 0, 0, 0, 0, 0, 1.0]).bounds == (0, 1, 8)
    sizes = child_sizes(model, torch.randn(32, 1, 8, 8))
    assert sizes[0] == 80 + 32 * 8 * 64 and sizes[7] == 10_250 + 32 * 10  # parameters + output elements
    with pytest.raises(GradshardError, match="one per child"):
        split_sequential(model, 2, [1.0, 2.0])
