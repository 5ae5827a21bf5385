"""Any `timm` model as the feature extractor, optionally from a local weights file."""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import Tensor, nn

from metarun.errors import ConfigError
from metarun.models.head import classifier_head
from metarun.models.weights import load_backbone_file


class TimmBackbone(nn.Module):
    """``timm.create_model(name, num_classes=0, in_chans=in_channels)`` as the embedding
    network (its pooled features), then an optional linear head; works in every algorithm's
    inner loop (`torch.func.functional_call`) like the built-in backbones.

    Nothing is downloaded: ``weights`` is a local state dict of the same architecture
    (``.safetensors``, or a ``.pth``/``.pt`` read with ``weights_only=True``), e.g. timm's
    pretrained weights saved on a connected machine; its classifier is ignored. The
    model's own normalisation layers are kept (batch norm with running statistics, for
    most CNNs), so ``task_batching=vmap`` is refused for those.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. "resnet18".
        in_channels: image channels (the dataset's ``channels``).
        image_size: input height and width (recorded; timm models pool globally).
        out_features: classes of the linear head, or None for an embedding network.
        weights: a local weights file, or None for a random initialisation.
    """

    def __init__(
        self,
        name: str,
        in_channels: int = 3,
        image_size: int = 84,
        out_features: int | None = None,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        import timm

        known = timm.list_models()
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
            raise ConfigError(f"model.name={name!r} is not allowed: timm has no such model ({hint}).")
        self.features = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
        if weights:
            load_backbone_file(self.features, Path(weights).expanduser(), "model.weights", name)
        self.image_size = image_size
        self.uses_context = False
        self.embedding_dim = int(self.features.num_features)
        self.head = classifier_head(self.embedding_dim, out_features)

    def forward(self, x: Tensor, context_size: int | None = None) -> Tensor:
        z = self.features(x)  # [M, D] pooled features
        return z if self.head is None else self.head(z)
