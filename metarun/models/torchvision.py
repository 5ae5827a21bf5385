"""Any torchvision classification model as the feature extractor, optionally from a local
weights file (e.g. torchvision's ImageNet weights, placed by hand: nothing is downloaded)."""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import Tensor, nn

from metarun.errors import ConfigError
from metarun.models.head import classifier_head
from metarun.models.weights import CLASSIFIER_NAMES, load_backbone_file


def resnet10() -> nn.Module:
    """ResNet-10: torchvision's ResNet with one basic block per stage (64, 128, 256, 512
    channels), the backbone of Chen et al. 2019 ("A Closer Look at Few-shot Classification")
    and of the cross-domain benchmark BSCD-FSL (Guo et al. 2020); torchvision builds it but
    does not name it."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1])


# Architectures of the few-shot literature that torchvision builds but does not name.
NAMED_HERE = {"resnet10": resnet10}


def first_linear(module: nn.Module) -> nn.Linear | None:
    """The first `nn.Linear` in ``module`` (itself included), or None."""
    return next((m for m in module.modules() if isinstance(m, nn.Linear)), None)


class TorchvisionBackbone(nn.Module):
    """``torchvision.models.get_model(name)`` without its ImageNet classifier as the embedding
    network (its pooled features), then an optional linear head; the same contract as
    `metarun.models.timm.TimmBackbone` (He et al. 2016 for the ResNets).

    The classifier is the model's ``fc``, ``classifier``, ``head`` or ``heads`` attribute,
    replaced by an identity, so ``embedding_dim`` is that classifier's input size (512 for
    resnet10/18/34, 2048 for resnet50). ``resnet10`` (`resnet10()`) is the few-shot
    literature's ResNet-10, which torchvision builds but does not name. With ``in_channels`` other than 3 the first
    convolution takes that many channels (and ImageNet weights no longer fit it).

    ``weights`` is a local state dict of the same architecture: torchvision publishes its
    ImageNet weights at ``https://download.pytorch.org/models/`` (e.g. resnet18's
    ``resnet18-f37072fd.pth``, `torchvision.models.ResNet18_Weights.IMAGENET1K_V1`); place
    the file on this machine and give its path. Its classifier is ignored.

    Args:
        name: a torchvision classification model (``torchvision.models.list_models()``) or
            ``resnet10``.
        in_channels: image channels (the dataset's ``channels``).
        image_size: input height and width (recorded; the models pool globally).
        out_features: classes of the linear head, or None for an embedding network.
        weights: a local weights file, or None for a random initialisation.
    """

    def __init__(
        self,
        name: str = "resnet18",
        in_channels: int = 3,
        image_size: int = 84,
        out_features: int | None = None,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        import torchvision

        known = [*NAMED_HERE, *torchvision.models.list_models(module=torchvision.models)]
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
            raise ConfigError(
                f"model.name={name!r} is not allowed: torchvision has no such classification model ({hint})."
            )
        features = NAMED_HERE[name]() if name in NAMED_HERE else torchvision.models.get_model(name, weights=None)
        where = next((n for n in CLASSIFIER_NAMES if isinstance(getattr(features, n, None), nn.Module)), None)
        linear = first_linear(getattr(features, where)) if where else None
        if where is None or linear is None:
            raise ConfigError(
                f"model.name={name!r} is not allowed: its classifier is not a linear layer under "
                f"{', '.join(CLASSIFIER_NAMES)}, so it cannot be removed; choose e.g. resnet18."
            )
        setattr(features, where, nn.Identity())
        if in_channels != 3:
            _set_input_channels(features, in_channels)
        self.features = features
        if weights:
            load_backbone_file(self.features, Path(weights).expanduser(), "model.weights", name)
        self.image_size = image_size
        self.uses_context = False
        self.embedding_dim = int(linear.in_features)
        self.head = classifier_head(self.embedding_dim, out_features)

    def forward(self, x: Tensor, context_size: int | None = None) -> Tensor:
        z = self.features(x)  # [M, D] pooled features
        return z if self.head is None else self.head(z)


def _set_input_channels(model: nn.Module, channels: int) -> None:
    """Replace the first convolution by one of the same shape taking ``channels`` inputs."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(
                    parent,
                    child_name,
                    nn.Conv2d(
                        channels,
                        child.out_channels,
                        child.kernel_size,
                        child.stride,
                        child.padding,
                        child.dilation,
                        child.groups,
                        child.bias is not None,
                    ),
                )
                return
