"""model=torchvision: ResNets without their classifier, any input channels, local weights files
(nothing downloaded), one sentence for a model or a file that does not fit."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms.protonet import ProtoNet
from metarun.errors import ConfigError
from metarun.models.torchvision import TorchvisionBackbone
from tests.models.backbones import image_batch


def backbone(name: str = "resnet18", **kwargs) -> TorchvisionBackbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TorchvisionBackbone(name, **{"in_channels": 3, "image_size": 16, **kwargs})


@pytest.mark.parametrize("name, dim", [("resnet10", 512), ("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_resnets_embed_to_their_classifier_input(name, dim) -> None:
    model = backbone(name, in_channels=1)
    assert model.embedding_dim == dim and model.head is None
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, dim)  # one channel, Omniglot's size
    assert backbone(name, out_features=5)(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_resnet10_is_resnet18_with_one_basic_block_per_stage() -> None:
    """Chen et al. 2019's ResNet-10: the stem and the stages of ResNet-18 (64-512 channels,
    strides 1, 2, 2, 2) with the second block of each stage left out."""
    from torchvision.models.resnet import BasicBlock

    ten, eighteen = backbone("resnet10"), backbone("resnet18")
    stages = [getattr(ten.features, f"layer{i}") for i in range(1, 5)]
    assert [len(s) for s in stages] == [1, 1, 1, 1] and all(isinstance(s[0], BasicBlock) for s in stages)
    second_blocks = sum(p.numel() for i in range(1, 5) for p in getattr(eighteen.features, f"layer{i}")[1].parameters())
    count = sum(p.numel() for p in ten.parameters())
    # by hand: stem 9,536 + stages 73,984 + 230,144 + 919,040 + 3,673,088 (convolutions, batch
    # norms, and the 1x1 shortcut of stages 2-4)
    assert count == sum(p.numel() for p in eighteen.parameters()) - second_blocks == 4_905_792
    keys = {k for k in eighteen.features.state_dict() if not k.split(".")[0].startswith("layer") or ".0." in k}
    assert set(ten.features.state_dict()) == keys  # the same names where both have the layer


def test_protonet_on_a_torchvision_backbone() -> None:
    alg = ProtoNet(backbone()).double()
    out = alg.meta_loss(image_batch(size=32))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.query_logits.shape == (2, 4, 2)
    assert alg.model.features.conv1.weight.grad.abs().sum() > 0


def test_weights_file_is_loaded_exactly_and_a_foreign_one_refused(tmp_path) -> None:
    """An ImageNet-style state dict (with its 1000-class fc, which is ignored) loads bitwise."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        imagenet = torchvision.models.resnet18()  # the layout of torchvision's published weights
    torch.save(imagenet.state_dict(), tmp_path / "resnet18.pth")
    loaded = backbone(weights=str(tmp_path / "resnet18.pth"))
    for key, value in imagenet.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(loaded.features.state_dict()[key], value), key
    with pytest.raises(ConfigError, match=r"model.weights=.* is not allowed with model.name=resnet34: it lacks"):
        backbone("resnet34", weights=str(tmp_path / "resnet18.pth"))
    with pytest.raises(ConfigError, match=r"conv1.weight has shape \(64, 3, 7, 7\), not \(64, 1, 7, 7\)"):
        backbone(in_channels=1, weights=str(tmp_path / "resnet18.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a readable weights file"):
        backbone(weights=str(tmp_path / "junk.pth"))
    with pytest.raises(ConfigError, match="no such file .nothing is downloaded at run time"):
        backbone(weights=str(tmp_path / "absent.pth"))


def test_unknown_or_headless_models_are_one_sentence() -> None:
    with pytest.raises(ConfigError, match="model.name='resnet181' is not allowed: torchvision has no such .*resnet18"):
        TorchvisionBackbone("resnet181")
    with pytest.raises(ConfigError, match="model.name='squeezenet1_0' is not allowed: its classifier is not a linear"):
        TorchvisionBackbone("squeezenet1_0")
