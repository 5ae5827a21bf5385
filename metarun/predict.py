"""Adapt a trained meta-learner to a user's own labelled examples and label new ones.

Images: ``metarun-predict ckpt_path=<.ckpt> support=<dir> query=<dir or file list>``, where
``support/<class name>/<images>`` holds any number of images per class and ``query`` is a
folder of images (searched recursively; with one subfolder per class the queries are
labelled and the accuracy is reported) or a text file of image paths.
Regression: ``support=points.csv query=xs.csv`` (columns ``x…`` and ``y…``).

The checkpoint's algorithm adapts exactly as in its meta-test (its own `predict`); images
are prepared exactly as its training data (the dataset's `prepare_image`). `load` is the
same thing for Python: ``learner = metarun.load(ckpt); learner.adapt(images, labels);
labels, probabilities = learner.predict(images)``.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from metarun.algorithms.base import MetaAlgorithm
from metarun.algorithms.transductive import check_transductive
from metarun.algorithms.transductive import describe as describe_inference
from metarun.build import build_learner, dataset_class, instantiate_checked
from metarun.catalog import CONFIG_DIR, head_free_learners, transductive_learners
from metarun.checkpoint_files import load_checkpoint, load_weights
from metarun.cli import exit_on_config_error, run_command
from metarun.datasets.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, ImageTooLarge, failure_reason, open_image
from metarun.episodes import VAL, EpisodeBatch, first_episodes
from metarun.errors import ConfigError
from metarun.init_from import describe
from metarun.results import write_results
from metarun.stats import mean_ci95, wilson_interval
from metarun.test_time import AUTO_EPISODES

log = logging.getLogger(__name__)
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


class Learner:
    """A trained meta-learner, ready to adapt to support examples and label queries.

    Build it with `load`. ``adapt(examples, labels)`` keeps the support set (images as paths,
    PIL images or ``[C, H, W]`` tensors in [0, 1]; labels as class names or numbers; for a
    regression checkpoint, ``x [K, Dx]`` and ``y [K, Dy]``); ``predict(examples)`` adapts to
    it exactly as the algorithm's meta-test does and returns ``(labels, probabilities
    [M, N])`` (regression: ``(mean [M, Dy], std [M, Dy] or None)``).

    Args:
        checkpoint: a checkpoint loaded by `metarun.checkpoints.load_checkpoint`.
        path: where it came from (for messages).
    """

    def __init__(
        self,
        checkpoint: dict[str, Any],
        path: str,
        test_time: dict[str, Any] | None = None,
        transductive: str | None = None,
    ) -> None:
        self.path = path
        self.config = OmegaConf.create(checkpoint["metarun_config"])
        if transductive is not None:  # label the queries together, over the checkpoint's own choice
            if "transductive" not in self.config.algorithm:
                learner = str(self.config.algorithm._target_).rsplit(".", 1)[-1]
                raise ConfigError(
                    f"transductive={transductive} is not allowed with this {learner} checkpoint: transductive "
                    f"inference is an option of {', '.join(transductive_learners())}, so drop it."
                )
            check_transductive(transductive)
            self.config.algorithm.transductive = transductive
        for key, value in (test_time or {}).items():  # fine-tuning at test time, over the checkpoint's own
            if value is not None:
                OmegaConf.update(self.config, f"test_time.{key}", value, force_add=True)
        objects = build_learner(self.config, initialise=False)  # the trained settings; no data is loaded
        module = objects["module"]
        load_weights(
            module,
            checkpoint,
            f"ckpt_path={path} is not allowed: its weights do not fit the model its config builds",
            "give a checkpoint written by this metarun",
        )
        self.algorithm: MetaAlgorithm = module.algorithm.eval()
        self.test_time = module.test_time  # the checkpoint's test_time settings, or the overrides
        self.regression: bool = objects["regression"]
        self.dataset = dataset_class(self.config.dataset)
        self.name = type(self.algorithm).__name__
        self.lineage: dict[str, Any] | None = checkpoint.get("metarun_lineage")
        self.inference = describe_inference(self.config.algorithm.get("transductive"))  # model.init_from's source
        self.classes: list[Any] = []
        self.converted = 0  # images whose colour mode was changed to the model's
        # images larger than this are skipped (the checkpoint dataset's decompression-bomb guard)
        self.max_pixels = int(self.config.dataset.get("max_image_pixels") or DEFAULT_MAX_PIXELS)
        self._support: tuple[Tensor, Tensor] | None = None
        mean, std = self.config.dataset.get("mean"), self.config.dataset.get("std")
        # the dataset's per-channel normalisation, as its episodes have it: [C, 1, 1] each, or None
        self.normalization = (
            None
            if mean is None or std is None
            else (torch.tensor(list(mean)).view(-1, 1, 1), torch.tensor(list(std)).view(-1, 1, 1))
        )

    # ------------------------------------------------------------------ examples

    def image(self, item: str | Path | Image.Image | Tensor) -> Tensor:
        """One example as the training loader gives it: float ``[C, H, W]`` in [0, 1]."""
        if isinstance(item, Tensor):
            return item.float()
        prepare = self.dataset.prepare_image
        if not self.dataset.takes_images:
            raise ConfigError(
                f"ckpt_path={self.path} is not allowed with images: it was trained "
                f"on {self.dataset.__name__}, which takes no image files."
            )
        if isinstance(item, Image.Image):
            return self._prepared(item, prepare)
        with open_image(item, self.max_pixels) as opened:
            return self._prepared(opened, prepare)

    @property
    def channels(self) -> int:
        """The channels the checkpoint's model was trained on (its dataset's ``channels``)."""
        return int(self.config.dataset.get("channels", 1))

    def _prepared(self, image: Image.Image, prepare: Any) -> Tensor:
        if (image.mode in GREY_MODES) != (self.channels == 1):
            self.converted += 1
        array = prepare(image, int(self.config.dataset.image_size), self.channels)  # uint8 [C, H, W]
        x = torch.from_numpy(np.array(array, dtype=np.uint8)).float().div_(255.0)  # [C, H, W]
        if self.normalization is not None:  # the dataset's normalisation, as in training
            mean, std = self.normalization
            x = (x - mean) / std
        return x

    def _stack(self, examples: Sequence[Any]) -> Tensor:
        if self.regression:
            return torch.as_tensor(np.asarray(examples, dtype=np.float32))  # [M, D]
        return torch.stack([self.image(e) for e in examples])  # [M, C, H, W]

    # ------------------------------------------------------------------ adapt and predict

    def adapt(self, examples: Sequence[Any], labels: Sequence[Any]) -> Learner:
        """Keep ``examples`` with their ``labels`` as the support set; returns self."""
        if len(examples) != len(labels) or not len(examples):
            raise ConfigError(
                f"support is not allowed: it has {len(examples)} examples and "
                f"{len(labels)} labels, so give one label per example (at least one)."
            )
        x = self._stack(examples)
        if self.regression:
            y = torch.as_tensor(np.asarray(labels, dtype=np.float32))
            self._support = (x, y.reshape(len(y), -1))  # [K, Dx], [K, Dy]
            return self
        self.classes = list(dict.fromkeys(labels))
        if len(self.classes) < 2:
            raise ConfigError(
                f"support is not allowed: it holds {len(self.classes)} class "
                f"({self.classes[0]!r}), so give examples of at least 2 classes."
            )
        heads = self.config.model.get("out_features") if "model" in self.config else None
        if heads is not None and heads != len(self.classes) and not self.regression:
            raise ConfigError(
                f"support is not allowed with this {self.name} checkpoint: it holds "
                f"{len(self.classes)} classes but the model's classifier head has {heads} "
                f"outputs, so give {heads} classes or train an algorithm without a fixed head "
                f"({', '.join(head_free_learners())})."
            )
        index = {c: i for i, c in enumerate(self.classes)}
        self._support = (x, torch.tensor([index[c] for c in labels]))  # [S, ...], [S]
        return self

    def batch(self, query: Tensor) -> EpisodeBatch:
        """The adapted support set and ``query`` as a one-task `EpisodeBatch` (the query
        labels are placeholders: no algorithm reads them to predict)."""
        if self._support is None:
            raise ValueError("call adapt(examples, labels) before predict(examples)")
        x, y = self._support
        shape = (1, len(query), y.shape[-1]) if self.regression else (1, len(query))
        dummy = torch.zeros(shape, dtype=y.dtype)
        return EpisodeBatch(
            support_x=x[None],
            support_y=y[None],
            query_x=query[None],
            query_y=dummy,
            task_params=None,
            index=torch.zeros(1, dtype=torch.long),
        )

    def predict(self, examples: Sequence[Any]) -> tuple[Any, Tensor | None]:
        """Labels and probabilities ``[M, N]`` of ``examples`` (regression: mean, std)."""
        query = self._stack(examples)
        if self.test_time.needs_lr:
            self.choose_test_time_lr()
        with torch.no_grad():  # as Lightning's test loop; learners enable gradients to adapt
            out = self.test_time.predict(self.algorithm, self.batch(query))
        if self.regression:
            std = None if out.query_std is None else out.query_std[0]
            return out.query_logits[0], std  # [M, Dy]
        probabilities = self.algorithm.query_probabilities(out.query_logits)[0]  # [M, N]
        return [self.classes[i] for i in probabilities.argmax(-1).tolist()], probabilities

    def choose_test_time_lr(self) -> None:
        """``test_time.lr=auto``: the rate is picked on the first validation episodes of the
        checkpoint's own dataset, as in its test (`metarun.test_time`)."""
        try:
            sampler = instantiate_checked(self.config.sampler)
            validation = instantiate_checked(self.config.dataset).split("val")  # the one split it needs
            episodes = first_episodes(sampler, validation, VAL, min(AUTO_EPISODES, sampler.val_episodes))
        except ConfigError as error:
            raise ConfigError(
                f"test_time.lr=auto is not allowed here: it picks the rate on validation episodes of the "
                f"checkpoint's dataset ({self.dataset.__name__}), which could not be read ({error}), so give "
                f"the rate, e.g. test_time.lr=0.001."
            ) from None
        with torch.no_grad():
            self.test_time.choose_lr(self.algorithm, episodes)


def load(ckpt_path: str | Path, test_time: dict[str, Any] | None = None, transductive: str | None = None) -> Learner:
    """A `Learner` from a metarun checkpoint, loaded safely (``weights_only=True``).

    ``test_time``: fine-tuning at test time over the checkpoint's own settings, e.g.
    ``{"finetune_steps": 20, "lr": 0.001}`` (`metarun.test_time.TestTimeFinetune`).
    ``transductive``: label the queries together (bd_cspn, tim, pt_map, or none), over the
    checkpoint's own ``algorithm.transductive``."""
    return Learner(load_checkpoint(ckpt_path), str(ckpt_path), test_time, transductive)


# ------------------------------------------------------------------ files a user points at


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _readable(learner: Learner, paths: list[Path], skipped: list[str]) -> list[tuple[Path, Tensor]]:
    """(path, tensor) of every file that decodes as an image; the rest go to ``skipped``."""
    out = []
    for path in paths:
        try:
            out.append((path, learner.image(path)))
        except ImageTooLarge as error:
            skipped.append(f"{path} (too large: {error}; dataset.max_image_pixels allows more)")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            skipped.append(f"{path} ({failure_reason(error)})")
    return out


def read_support(learner: Learner, folder: str, skipped: list[str]) -> dict[str, list[tuple[Path, Tensor]]]:
    """``{class name: [(path, image)]}`` from ``folder/<class>/<images>``, classes sorted."""
    root = Path(folder)
    key = f"support={folder}"
    if not root.is_dir():
        found = "a file" if root.is_file() else "no such folder"
        raise ConfigError(
            f"{key} is not allowed: it is {found}, and this checkpoint was trained on "
            f"{learner.dataset.__name__} images, so give a folder with one subfolder of images per class."
        )
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        names = ", ".join(p.name for p in classes) or "none"
        raise ConfigError(
            f"{key} is not allowed: it holds {len(classes)} class folder ({names}), "
            f"so give at least 2 class folders of images."
        )
    out = {}
    for folder_of_class in classes:
        files = sorted(p for p in folder_of_class.rglob("*") if p.is_file())
        images = _readable(learner, [p for p in files if _is_image(p)], skipped)
        skipped.extend(f"{p} (not an image)" for p in files if not _is_image(p) and not p.name.startswith("."))
        if not images:
            raise ConfigError(
                f"{key} is not allowed: its class folder {folder_of_class.name!r} "
                f"holds no readable images, so add images to it or remove it."
            )
        out[folder_of_class.name] = images
    return out


def read_queries(
    learner: Learner, query: str, classes: list[str], skipped: list[str]
) -> tuple[list[tuple[Path, Tensor]], list[str] | None]:
    """The query images and, when ``query`` has one subfolder per class, their labels."""
    source = Path(query)
    key = f"query={query}"
    labels: list[str] | None = None
    if source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines() if line.strip()]
        # a relative path: from the list's folder, else from the working directory (`ls d/*/*.png > list.txt`)
        paths = [
            Path(p) if Path(p).is_absolute() or not (source.parent / p).is_file() else source.parent / p for p in lines
        ]
        missing = [p for p in paths if not p.is_file()]
        skipped.extend(f"{p} (no such file)" for p in missing)
        images = _readable(learner, [p for p in paths if p.is_file()], skipped)
    elif source.is_dir():
        subfolders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
        loose = [p for p in source.iterdir() if _is_image(p)]
        if subfolders and not loose:  # labelled queries: one subfolder per class
            unknown = [p.name for p in subfolders if p.name not in classes]
            if unknown:
                raise ConfigError(
                    f"{key} is not allowed: its class folder {unknown[0]!r} is not "
                    f"one of the support classes ({', '.join(classes)}), so name "
                    f"query subfolders after support classes or give unlabelled "
                    f"images."
                )
            images, labels = [], []
            for sub in subfolders:
                found = _readable(learner, sorted(p for p in sub.rglob("*") if _is_image(p)), skipped)
                images += found
                labels += [sub.name] * len(found)
        else:
            images = _readable(learner, sorted(p for p in source.rglob("*") if _is_image(p)), skipped)
    else:
        raise ConfigError(
            f"{key} is not allowed: no such file or folder, so give a folder of images or a text file of image paths."
        )
    if not images:
        raise ConfigError(
            f"{key} is not allowed: it holds no readable images, so give a folder "
            f"of images (searched recursively) or a text file of image paths."
        )
    return images, labels


def read_points(path: str, key: str, need_y: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``x [M, Dx]`` and ``y [M, Dy]`` (or None) from a CSV with columns ``x…`` and ``y…``."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(
            f"{key}={path} is not allowed: it is a folder, but this checkpoint was trained on regression "
            f"tasks, so give a CSV file with columns x... and y... (an image checkpoint takes folders)."
        )
    if not file.is_file():
        raise ConfigError(f"{key}={path} is not allowed: no such file, so give a CSV file with columns x (and y).")
    with open(file, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0].keys()) if rows else []
    xs = [c for c in columns if c and c.strip().lower().startswith("x")]
    ys = [c for c in columns if c and c.strip().lower().startswith("y")]
    if not rows or not xs or (need_y and not ys):
        want = "x… and y…" if need_y else "x…"
        raise ConfigError(
            f"{key}={path} is not allowed: it has no rows with columns {want} "
            f"(found {', '.join(columns) or 'none'}), so give a CSV file with a "
            f"header such as x,y."
        )
    try:
        x = np.array([[float(r[c]) for c in xs] for r in rows], dtype=np.float32)
        y = np.array([[float(r[c]) for c in ys] for r in rows], dtype=np.float32) if ys else None
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"{key}={path} is not allowed: a value is not a number ({error}), so give numbers only."
        ) from None
    return x, y


# ------------------------------------------------------------------ the command


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run `metarun-predict`: adapt, label, and write predictions.csv, predict.json and a picture."""
    for key in ("ckpt_path", "support", "query"):
        if OmegaConf.is_missing(cfg, key) or not cfg.get(key):
            raise ConfigError(
                f"{key} is not set: metarun-predict needs ckpt_path=<.ckpt>, "
                f"support=<folder or .csv> and query=<folder, file list or .csv>."
            )
    started = time.perf_counter()
    test_time = OmegaConf.to_container(cfg.test_time) if cfg.get("test_time") else None
    learner = load(cfg.ckpt_path, test_time, cfg.get("transductive"))  # type: ignore[arg-type]
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if learner.regression:
        report = predict_points(learner, cfg, out)
    else:
        report = predict_images(learner, cfg, out)
    report["seconds"] = time.perf_counter() - started
    if learner.test_time.enabled:
        report["test_time"] = learner.test_time.settings()
    report["inference"] = learner.inference
    if learner.inference != "inductive":
        print(f"inference: {learner.inference}: the queries were labelled together, from their own features")
    if learner.lineage:
        report["lineage"] = learner.lineage
        print(describe(learner.lineage))
    write_results(out, report, "predict.json")
    print(f"predictions: {out / report['predictions']}")
    return report


def predict_images(learner: Learner, cfg: DictConfig, out: Path) -> dict[str, Any]:
    skipped: list[str] = []
    support = read_support(learner, cfg.support, skipped)
    classes = list(support)
    learner.adapt(
        [t for images in support.values() for _, t in images], [c for c, images in support.items() for _ in images]
    )
    queries, truth = read_queries(learner, cfg.query, classes, skipped)
    labels, probabilities = learner.predict([t for _, t in queries])
    if skipped:
        log.warning(
            "Skipped %d files that are not readable images: %s%s",
            len(skipped),
            "; ".join(skipped[:5]),
            " ..." if len(skipped) > 5 else "",
        )
    if learner.converted:
        mode = "grey" if learner.channels == 1 else "RGB"
        log.warning(
            "Converted %d images to %s, as the checkpoint's model was trained on %s images.",
            learner.converted,
            mode,
            mode,
        )
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "predicted", *[f"p({c})" for c in classes], *(["true"] if truth else [])])
        for i, ((path, _), label) in enumerate(zip(queries, labels)):
            row = [str(path), label, *[f"{p:.6f}" for p in probabilities[i].tolist()]]
            writer.writerow(row + ([truth[i]] if truth else []))
    report: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt_path),
        "algorithm": learner.name,
        "support": {c: len(images) for c, images in support.items()},
        "queries": len(queries),
        "skipped": skipped,
        "converted": learner.converted,
        "predictions": "predictions.csv",
        "picture": "predictions.png",
    }
    if truth:
        correct = [float(p == t) for p, t in zip(labels, truth)]
        low, high = wilson_interval(int(sum(correct)), len(correct))  # a proportion over few queries
        mean = torch.tensor(correct).mean().item()  # in float32, as metarun-eval's episode accuracy
        report["accuracy"] = {"mean": mean, "ci95_low": low, "ci95_high": high, "interval": "wilson"}
        report["accuracy"]["queries"] = len(correct)
        print(
            f"accuracy: {100 * mean:.4g}% (95% Wilson interval {100 * low:.3g}–{100 * high:.3g}%, "
            f"{int(sum(correct))} of {len(correct)} labelled queries)"
        )
    from metarun.plots import plot_predictions

    plot_predictions(
        support,
        queries,
        labels,
        probabilities,
        truth,
        out / "predictions.png",
        int(cfg.picture_queries),
        normalization=learner.normalization,
    )
    return report


def predict_points(learner: Learner, cfg: DictConfig, out: Path) -> dict[str, Any]:
    sx, sy = read_points(cfg.support, "support", need_y=True)
    qx, qy = read_points(cfg.query, "query", need_y=False)
    learner.adapt(sx, sy)
    mean, std = learner.predict(qx)
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        dims = mean.shape[1]
        writer.writerow(
            [
                *[f"x{i}" for i in range(qx.shape[1])],
                *[f"y{i}" for i in range(dims)],
                *([f"std{i}" for i in range(dims)] if std is not None else []),
            ]
        )
        for i in range(len(qx)):
            values = [*qx[i].tolist(), *mean[i].tolist(), *(std[i].tolist() if std is not None else [])]
            writer.writerow([f"{v:.7g}" for v in values])
    report: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt_path),
        "algorithm": learner.name,
        "support": {"points": len(sx)},
        "queries": len(qx),
        "predictions": "predictions.csv",
        "picture": "predictions.png",
    }
    if qy is not None:
        mse = ((mean.numpy() - qy) ** 2).mean(1)
        m, ci = mean_ci95(mse.tolist())
        report["mse"] = {"mean": m, "ci95": ci, "queries": len(qy)}
        print(f"mse: {m:.4g} ± {ci:.2g} (95% CI, {len(qy)} labelled queries)")
    from metarun.plots import plot_points

    plot_points(sx, sy, qx, mean.numpy(), None if std is None else std.numpy(), out / "predictions.png")
    return report


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@exit_on_config_error
def hydra_main(cfg: DictConfig) -> None:
    predict(cfg)


def main() -> None:
    """The ``metarun-predict`` command."""
    run_command(hydra_main)


if __name__ == "__main__":
    main()


__all__ = ["Learner", "load", "predict"]
