"""Training augmentation: exact crops and flips, jitter within its range, deterministic under
the task's generator, identical whatever the number of processes, never on evaluation."""

from __future__ import annotations

import pytest
import torch

from metarun.datasets.base import ClassImages
from metarun.episodes import EpisodeSampler
from metarun.errors import ConfigError
from metarun.transforms import Augment


def images(m: int = 6, c: int = 3, size: int = 8) -> torch.Tensor:
    return torch.rand(m, c, size, size, generator=torch.Generator().manual_seed(0))


def test_pad_crop_is_a_whole_pixel_shift_with_zeros() -> None:
    x = images()
    out = Augment(crop="pad", padding=2, flip=False)(x, torch.Generator().manual_seed(3))
    for i in range(len(x)):
        matched = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
                crop = padded[:, 2 + dy : 2 + dy + 8, 2 + dx : 2 + dx + 8]
                matched.append(torch.equal(crop, out[i]))
        assert sum(matched) == 1, i


def test_flip_mirrors_about_half_the_images() -> None:
    x = images(m=400, size=4)
    out = Augment(crop="none", flip=True)(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 150 < sum(flipped) < 250


def test_resized_crop_and_jitter_stay_in_range() -> None:
    x = images(m=50, size=16)
    augment = Augment(crop="resized", scale=(0.2, 1.0), flip=True, brightness=0.4, contrast=0.4, saturation=0.4)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(out, x)
    grey = images(m=5, c=1)
    assert Augment(saturation=0.5, flip=False)(grey, torch.Generator().manual_seed(0)).shape == grey.shape
    bright = Augment(brightness=0.5, flip=False)(torch.full((200, 3, 2, 2), 0.5), torch.Generator().manual_seed(0))
    factors = bright[:, 0, 0, 0] / 0.5
    assert factors.min() >= 0.5 - 1e-6 and factors.max() <= 1.5 + 1e-6 and factors.std() > 0.2


def test_deterministic_under_the_generator() -> None:
    augment = Augment(crop="resized", flip=True, brightness=0.4, contrast=0.4, saturation=0.4)
    x = images()
    a = augment(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(8)))


def _split() -> ClassImages:
    pixels = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ClassImages(pixels, torch.arange(40) % 8, "t", mean=[0.5] * 3, std=[0.25] * 3)


def test_training_episodes_are_augmented_the_same_on_one_and_two_processes() -> None:
    """Rank r of W draws tasks r*B/W.. of the step from the tasks' own generators, so the
    augmented meta-batch of 1 process is the concatenation of the 2 processes' slices."""
    sampler, split = EpisodeSampler(5, 1, 2, meta_batch_size=4), _split()
    augment = Augment(crop="pad", padding=2, flip=True, brightness=0.3)
    for step in (0, 5):
        one = sampler.train_batch(split, step, augment=augment)
        two = [sampler.train_batch(split, step, rank, 2, augment=augment) for rank in (0, 1)]
        assert torch.equal(torch.cat([b.support_x for b in two]), one.support_x)
        assert torch.equal(torch.cat([b.query_x for b in two]), one.query_x)
        plain = sampler.train_batch(split, step)
        assert torch.equal(plain.support_y, one.support_y)  # the same tasks, augmented
        assert not torch.equal(plain.support_x, one.support_x)


def test_evaluation_episodes_are_never_augmented() -> None:
    """The datamodule gives the augmentation to training episodes only."""
    from metarun.datamodule import EpisodicDataModule

    class Data:
        def split(self, name):
            return _split()

    sampler = EpisodeSampler(5, 1, 2, meta_batch_size=2, val_episodes=3, test_episodes=3, eval_batch_size=3)
    module = EpisodicDataModule(Data(), sampler, augment=Augment(crop="pad", brightness=0.3))
    module.prepare()
    plain = EpisodicDataModule(Data(), sampler)
    plain.prepare()
    for name in ("val_dataloader", "test_dataloader"):
        got, expected = next(iter(getattr(module, name)())), next(iter(getattr(plain, name)()))
        assert torch.equal(got.support_x, expected.support_x) and torch.equal(got.query_x, expected.query_x)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"crop": "zoom"}, "transform.crop"),
        ({"padding": -1}, "transform.padding"),
        ({"scale": (0.5, 0.2)}, "transform.scale"),
        ({"ratio": (0.0, 1.0)}, "transform.ratio"),
        ({"brightness": 1.5}, "transform.brightness"),
        ({"saturation": -0.1}, "transform.saturation"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Augment(**kwargs)
