"""ResNet-12: the published shapes, MAML's meta-gradient through it against finite
differences under each batch-norm mode, ProtoNet on it, and DropBlock."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms.maml import MAML
from metarun.algorithms.protonet import ProtoNet
from metarun.errors import ConfigError
from metarun.models.resnet12 import DropBlock, ResNet12
from tests.models.backbones import check_maml_finite_differences, image_batch


def tiny(norm: str = "transductive", **kwargs) -> ResNet12:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ResNet12(3, 32, widths=[2, 3, 2, 3], norm=norm, **kwargs)


def test_published_shapes() -> None:
    model = ResNet12(3, 84)
    assert model.feature_shape == (640, 5, 5) and model.embedding_dim == 640
    assert model(torch.zeros(2, 3, 84, 84)).shape == (2, 640)
    params = sum(p.numel() for p in model.parameters())
    assert 12.0e6 < params < 12.6e6  # MetaOptNet's ResNet-12: 12.4 M parameters
    assert ResNet12(1, 28, out_features=5)(torch.zeros(3, 1, 28, 28)).shape == (3, 5)
    assert ResNet12(3, 84, pool="none").embedding_dim == 640 * 25


@pytest.mark.parametrize("norm", ["transductive", "tasknorm", "none"])
def test_maml_meta_gradient_matches_finite_differences(norm: str) -> None:
    model = tiny(norm, out_features=2)
    names = ["features.0.conv1.weight", "features.3.shortcut.weight", "head.weight", "head.bias"]
    if norm != "none":
        names.append("features.2.norm3.weight")
    check_maml_finite_differences(model, names, image_batch(size=32))


def test_protonet_embeds_and_learns_a_gradient() -> None:
    alg = ProtoNet(tiny()).double()
    batch = image_batch(size=32)
    out = alg.meta_loss(batch)
    assert out.query_logits.shape == (2, 4, 2) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in alg.parameters())


def test_dropblock_drops_blocks_at_its_rate_and_only_in_training() -> None:
    drop = DropBlock(0.2, 3, seed=0)
    x = torch.ones(16, 8, 10, 10)
    out = drop(x)
    zero = (out == 0).float().mean().item()
    assert 0.12 < zero < 0.28
    assert torch.allclose(out.mean(), torch.tensor(1.0), atol=0.02)  # rescaled
    drop.eval()
    assert torch.equal(drop(x), x)


def test_dropblock_masks_resume_from_the_state_dict() -> None:
    model = tiny(drop_rate=0.3, drop_block_size=2)
    model.train()
    x = torch.rand(4, 3, 32, 32)
    model(x)
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    expected = model(x)
    restored = tiny(drop_rate=0.3, drop_block_size=2)
    restored.load_state_dict(saved)
    restored.train()
    torch.testing.assert_close(restored(x), expected)


def test_dropblock_refuses_vmap_and_bad_settings() -> None:
    alg = MAML(tiny(drop_rate=0.1, out_features=2), 0.1, 1, 1)
    with pytest.raises(ConfigError, match="DropBlock model.features.2.drop draws a random mask per task"):
        alg.set_task_batching("vmap")
    MAML(tiny(out_features=2), 0.1, 1, 1).set_task_batching("vmap")  # rate 0: fine
    for kwargs, key in (
        ({"widths": [1, 2, 3]}, "model.widths"),
        ({"drop_rate": 1.0}, "model.drop_rate"),
        ({"pool": "max"}, "model.pool"),
    ):
        with pytest.raises(ConfigError, match=key):
            ResNet12(3, 84, **kwargs)
    with pytest.raises(ConfigError, match="model.image_size=8 is not allowed"):
        ResNet12(3, 8)
