"""R2-D2's backbone: the authors' embedding sizes, the two blocks' features concatenated as
their RRFeatures does, seeded dropout in training only, and MAML's meta-gradient through it
against finite differences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metarun.algorithms.tasks import modules_vmap_refusal
from metarun.errors import ConfigError
from metarun.models.r2d2net import R2D2Net
from tests.models.backbones import check_maml_finite_differences, image_batch


def test_the_authors_embedding_sizes() -> None:
    assert R2D2Net(3, 84).embedding_dim == (384 + 512) * 9 * 9  # 72,576 on mini-ImageNet
    assert R2D2Net(3, 32).embedding_dim == (384 + 512) * 3 * 3  # 8,064 on CIFAR-FS
    model = R2D2Net(1, 28, widths=(4, 4, 4, 4), out_features=5)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 5)


def test_the_embedding_is_the_third_block_pooled_beside_the_fourth() -> None:
    model = R2D2Net(3, 32, widths=(4, 5, 6, 7), norm="none").eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    h = x
    for block in model.blocks[:3]:
        h = block(h)
    third = nn.functional.max_pool2d(h, 2, stride=1)  # [3, 6, 3, 3]
    fourth = model.blocks[3](h)  # [3, 7, 3, 3]
    torch.testing.assert_close(model(x), torch.cat([third.flatten(1), fourth.flatten(1)], 1))
    assert model(x).shape == (3, (6 + 7) * 9)


def test_dropout_is_seeded_saved_and_only_in_training() -> None:
    model = R2D2Net(3, 32, widths=(4, 4, 4, 4), drop_rate=0.5, norm="none")
    x = torch.ones(2, 3, 32, 32)
    state = model.state_dict()
    first = model(x)
    model.load_state_dict(state)  # the generators' state: the same masks again
    torch.testing.assert_close(model(x), first)
    assert not torch.equal(model(x), first)  # the next draw differs
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    assert "task_batching=loop or model.drop_rate=0" in modules_vmap_refusal(model)
    assert modules_vmap_refusal(R2D2Net(3, 32, widths=(4, 4, 4, 4), norm="none")) is None


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"widths": (4, 4, 4)}, "model.widths"),
        ({"drop_rate": 1.0}, "model.drop_rate"),
        ({"image_size": 8}, "model.image_size"),
    ],
)
def test_bad_settings_name_the_key(kwargs, key) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        R2D2Net(**({"in_channels": 3, "image_size": 32} | kwargs))


def test_maml_meta_gradient_matches_finite_differences() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = R2D2Net(3, 16, widths=(3, 3, 3, 3), out_features=2, norm="transductive")
    names = ["blocks.0.0.weight", "blocks.2.1.weight", "blocks.3.0.weight", "head.weight"]
    check_maml_finite_differences(model, names, image_batch(size=16))
