"""model=timm: a timm backbone through MAML's inner loop (finite differences), ProtoNet, and
local weights files (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metarun.algorithms.protonet import ProtoNet
from metarun.errors import ConfigError
from metarun.models.timm import TimmBackbone
from tests.models.backbones import check_maml_finite_differences, image_batch

NAME = "test_efficientnet_gn"  # one of timm's tiny test models, with group norm


def backbone(**kwargs) -> TimmBackbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TimmBackbone(NAME, **{"in_channels": 3, "image_size": 16, **kwargs})


def test_maml_meta_gradient_matches_finite_differences() -> None:
    model = backbone(out_features=2, image_size=32)
    names = ["features.bn1.weight", "features.blocks.0.0.bn1.bias", "head.bias"]  # the stem's and a block's norm
    check_maml_finite_differences(model, names, image_batch(size=32))


def test_protonet_on_a_timm_backbone() -> None:
    alg = ProtoNet(backbone()).double()
    out = alg.meta_loss(image_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.query_logits.shape == (2, 4, 2)
    assert alg.model.embedding_dim == alg.model(torch.zeros(1, 3, 16, 16, dtype=torch.float64)).shape[-1]


def test_local_weights_are_loaded_and_checked(tmp_path: Path) -> None:
    source = backbone()
    state = {**source.features.state_dict(), "classifier.weight": torch.zeros(10, 4)}  # a classifier is ignored
    torch.save(state, tmp_path / "weights.pth")
    loaded = TimmBackbone(NAME, 3, 16, weights=str(tmp_path / "weights.pth"))
    for key, value in source.features.state_dict().items():
        assert torch.equal(loaded.features.state_dict()[key], value)
    from safetensors.torch import save_file

    save_file(source.features.state_dict(), str(tmp_path / "weights.safetensors"))
    TimmBackbone(NAME, 3, 16, weights=str(tmp_path / "weights.safetensors"))
    with pytest.raises(ConfigError, match="model.weights=.* is not allowed with model.name=test_efficientnet_gn"):
        TimmBackbone(NAME, 1, 16, weights=str(tmp_path / "weights.pth"))  # 1 input channel: other shapes
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a readable weights file"):
        TimmBackbone(NAME, 3, 16, weights=str(tmp_path / "junk.pth"))
    with pytest.raises(ConfigError, match="no such file"):
        TimmBackbone(NAME, 3, 16, weights=str(tmp_path / "absent.pth"))


def test_unknown_model_name_suggests_close_ones() -> None:
    with pytest.raises(ConfigError, match="model.name='resnet181' is not allowed: timm has no such model .*resnet18"):
        TimmBackbone("resnet181")
