"""SimpleShot's feature transforms: the formulas, evaluation only, the training mean measured with
the evaluated weights and kept in the checkpoint, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metarun
from metarun.algorithms.feature_transform import CHUNK, MEAN_IMAGES, STREAM, FeatureTransform
from metarun.algorithms.meta_baseline import MetaBaseline
from metarun.algorithms.protonet import ProtoNet
from metarun.build import build_learner
from metarun.errors import ConfigError
from metarun.runner import train
from tests.algorithms.test_meta_baseline import random_batch
from tests.conftest import TINY, compose_config, data_dir


class Flat(nn.Flatten):
    """5-d points stored as [1, 1, 5] images, as an embedding network."""

    embedding_dim = 5


def fitted(kind: str, mean: torch.Tensor) -> FeatureTransform:
    transform = FeatureTransform(kind, 5).double()
    transform.fit(nn.Identity(), mean[None])  # the mean of one "image": itself
    return transform


def test_l2n_and_cl2n_are_the_formulas():
    z = torch.randn(3, 4, 5, dtype=torch.float64)
    mean = torch.randn(5, dtype=torch.float64)
    assert torch.equal(FeatureTransform("none")(z), z)
    torch.testing.assert_close(FeatureTransform("l2n")(z), z / z.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(fitted("cl2n", mean)(z), (z - mean) / (z - mean).norm(dim=-1, keepdim=True))
    with pytest.raises(RuntimeError, match="fit the training mean"):
        FeatureTransform("cl2n", 5)(z)


def test_fit_is_the_mean_feature_whatever_the_chunks():
    images = torch.randn(600, 1, 1, 5, dtype=torch.float64)  # more than one chunk
    transform = FeatureTransform("cl2n", 5).double()
    transform.fit(Flat(), images)
    torch.testing.assert_close(transform.mean, images.flatten(1).mean(0).float().double())
    assert bool(transform.fitted)


@pytest.mark.parametrize("learner", ["protonet", "meta_baseline"])
def test_evaluation_episodes_use_the_transformed_features_and_training_does_not(learner):
    batch = random_batch()
    mean = torch.randn(5, dtype=torch.float64)

    def build(kind: str):
        alg = ProtoNet(Flat(), kind) if learner == "protonet" else MetaBaseline(Flat(), 7.0, True, kind)
        alg = alg.double()
        if kind == "cl2n":
            alg.features.fit(nn.Identity(), mean[None])
        return alg

    plain, centred = build("none"), build("cl2n")
    torch.testing.assert_close(centred.train().meta_loss(batch).loss, plain.train().meta_loss(batch).loss)
    support = F.normalize(batch.support_x.flatten(2) - mean, dim=-1)  # [B, 6, 5]
    query = F.normalize(batch.query_x.flatten(2) - mean, dim=-1)  # [B, 4, 5]
    logits = centred.eval().predict(batch).query_logits
    for b in range(2):
        centroids = torch.stack([support[b, batch.support_y[b] == n].mean(0) for n in range(3)])  # [3, 5]
        if learner == "protonet":  # SimpleShot: Euclidean nearest centroid of the transformed features
            expected = -torch.cdist(query[b], centroids).pow(2)
        else:
            expected = 7.0 * F.normalize(query[b], dim=-1) @ F.normalize(centroids, dim=-1).T
        torch.testing.assert_close(logits[b], expected)


def test_a_bad_transform_is_one_sentence(tmp_path):
    with pytest.raises(
        ConfigError, match="algorithm.feature_transform='zca' is not allowed: it must be one of none, l2n, cl2n."
    ):
        build_learner(
            compose_config(["dataset=omniglot", "algorithm=protonet", "algorithm.feature_transform=zca"], tmp_path)
        )


@pytest.mark.slow
def test_the_training_mean_is_measured_with_the_best_weights_and_kept_in_the_checkpoint(tmp_path, one_thread):
    root = data_dir()
    if root is None or not (root / "omniglot" / "images_background.zip").exists():
        pytest.skip("METARUN_DATA_DIR with omniglot/ is not set (.ci/run sets it)")
    overrides = [
        *TINY,
        "dataset=omniglot",
        "model.hidden=8",
        "sampler.ways=5",
        "sampler.shots=1",
        "sampler.queries=3",
        "algorithm=pretrain",
        "sampler.batch_size=16",
        "algorithm.feature_transform=cl2n",
    ]
    results, objects = train(compose_config(overrides, tmp_path))
    algorithm = objects["algorithm"].eval()
    images = objects["datamodule"].training_images(MEAN_IMAGES, STREAM)
    assert images.shape[0] == MEAN_IMAGES
    with torch.no_grad():
        # the tested (best) weights' mean feature, in the same chunks (batch statistics)
        expected = torch.cat([algorithm.model(chunk) for chunk in images.split(CHUNK)]).mean(0)
    torch.testing.assert_close(algorithm.features.mean, expected, rtol=1e-5, atol=1e-6)
    learner = metarun.load(results["val"]["best_checkpoint"])
    assert torch.equal(learner.algorithm.features.mean, algorithm.features.mean)
