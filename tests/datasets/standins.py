"""Small stand-ins of the image benchmarks, in each real on-disk format, named after the
published split lists (the images are not redistributable, so tests build their own).

Every class gets its own colour and shape (`class_image`), so the stand-ins also serve
the learning tests: the classes truly differ, and a learner can beat chance.
"""

from __future__ import annotations

import colorsys
import csv
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from metarun.datasets.bscd_fsl import CHESTX, CROP_DISEASES, EUROSAT, ISIC
from metarun.datasets.images import SPLITS, packaged_lines
from metarun.datasets.tiered_imagenet import split_classes


def class_image(label: int, index: int, size: int = 16, grey: bool = False) -> Image.Image:
    """Image ``index`` of class ``label``: the class's shape (one of 4) in the class's colour
    on a noisy dark background, at a random position and size."""
    rng = np.random.default_rng([label, index])
    background = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    hue = (label * 0.618034) % 1.0
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.9, 0.6 + 0.4 * ((label // 7) % 2)))
    extent = size * rng.uniform(0.45, 0.7)
    x0, y0 = rng.uniform(0, size - extent, 2)
    box = (x0, y0, x0 + extent, y0 + extent)
    shape = (label // 3) % 4
    if shape == 0:
        draw.ellipse(box, fill=colour)
    elif shape == 1:
        draw.rectangle(box, fill=colour)
    elif shape == 2:
        draw.polygon([(x0, y0 + extent), (x0 + extent / 2, y0), (x0 + extent, y0 + extent)], fill=colour)
    else:
        w = extent / 4
        draw.rectangle((x0 + extent / 2 - w / 2, y0, x0 + extent / 2 + w / 2, y0 + extent), fill=colour)
        draw.rectangle((x0, y0 + extent / 2 - w / 2, x0 + extent, y0 + extent / 2 + w / 2), fill=colour)
    return image.convert("L") if grey else image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mini_imagenet_classes(split: str) -> list[str]:
    return packaged_lines("mini_imagenet", f"{split}.txt")


def mini_imagenet_csv(root: Path, per_class: int = 3, size: int = 16) -> Path:
    """``images/<wnid><8 digits>.jpg`` and ``{split}.csv`` as Ravi & Larochelle publish them."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    label = 0
    for split in SPLITS:
        rows = []
        for wnid in mini_imagenet_classes(split):
            for i in range(per_class):
                name = f"{wnid}{i + 1:08d}.jpg"
                class_image(label, i, size).save(root / "images" / name, quality=95)
                rows.append((name, wnid))
            label += 1
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            writer.writerows(rows)
    return root


def mini_imagenet_pickles(root: Path, per_class: int = 3, size: int = 16) -> Path:
    """``mini-imagenet-cache-{split}.pkl``: ``image_data [N, H, W, 3]`` and ``class_dict``."""
    root.mkdir(parents=True, exist_ok=True)
    label = 0
    for split in SPLITS:
        images, class_dict = [], {}
        for wnid in mini_imagenet_classes(split):
            class_dict[wnid] = list(range(len(images), len(images) + per_class))
            images += [np.asarray(class_image(label, i, size)) for i in range(per_class)]
            label += 1
        data = {"image_data": np.stack(images), "class_dict": class_dict}
        (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(data, protocol=4))
    return root


def tiered_folders(root: Path, per_class: int = 2, size: int = 16) -> Path:
    """ImageNet's ``train/<wnid>/<wnid>_<n>.JPEG`` for every tiered-ImageNet class."""
    label = 0
    for split in SPLITS:
        for wnid, _ in split_classes(split):
            folder = root / "train" / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                class_image(label, i, size).save(folder / f"{wnid}_{i + 1}.JPEG", format="JPEG", quality=95)
            label += 1
    return root


def tiered_pickles(root: Path, per_class: int = 2, size: int = 16) -> Path:
    """``{split}_images_png.pkl`` (PNG bytes as uint8 arrays ``[n, 1]``, as cv2.imencode gives
    them) and ``{split}_labels.pkl``, images shuffled across classes."""
    root.mkdir(parents=True, exist_ok=True)
    label = 0
    for split in SPLITS:
        classes = split_classes(split)
        categories = sorted({c for _, c in classes})
        encoded, specific, general = [], [], []
        for k, (_, category) in enumerate(classes):
            for i in range(per_class):
                data = np.frombuffer(png_bytes(class_image(label + k, i, size)), dtype=np.uint8)
                encoded.append(data.reshape(-1, 1))
                specific.append(k)
                general.append(categories.index(category))
        label += len(classes)
        order = np.random.default_rng(0).permutation(len(encoded))
        labels = {
            "label_specific": np.asarray(specific)[order],
            "label_general": np.asarray(general)[order],
            "label_specific_str": [wnid for wnid, _ in classes],
            "label_general_str": categories,
        }
        with (root / f"{split}_images_png.pkl").open("wb") as f:  # streamed: no second copy in memory
            pickle.dump([encoded[i] for i in order], f, protocol=4)
        (root / f"{split}_labels.pkl").write_bytes(pickle.dumps(labels, protocol=4))
    return root


def cifar_names() -> tuple[list[str], list[str], dict[str, str]]:
    """CIFAR-100's fine and coarse names (alphabetical, as its meta file) and each fine
    class's superclass, from CIFAR-FS's published ``[superclass, class]`` pairs."""
    pairs = [pair for split in SPLITS for pair in json.loads("\n".join(packaged_lines("cifar_fs", f"{split}.json")))]
    coarse_of = {fine: coarse for coarse, fine in pairs}
    return sorted(coarse_of), sorted(set(coarse_of.values())), coarse_of


def cifar_archive(root: Path, train_per_class: int = 2, test_per_class: int = 1) -> Path:
    """``cifar-100-python.tar.gz`` with ``train``, ``test`` and ``meta`` pickles (32×32 RGB)."""
    root.mkdir(parents=True, exist_ok=True)
    fine, coarse, coarse_of = cifar_names()
    members = {}
    for part, count in (("train", train_per_class), ("test", test_per_class)):
        data, fine_labels, coarse_labels = [], [], []
        offset = 0 if part == "train" else train_per_class
        for label, name in enumerate(fine):
            for i in range(count):
                data.append(np.asarray(class_image(label, offset + i, 32)).transpose(2, 0, 1).reshape(-1))
                fine_labels.append(label)
                coarse_labels.append(coarse.index(coarse_of[name]))
        table = {"data": np.stack(data), "fine_labels": fine_labels, "coarse_labels": coarse_labels}
        members[part] = pickle.dumps(table, protocol=2)
    members["meta"] = pickle.dumps({"fine_label_names": fine, "coarse_label_names": coarse}, protocol=2)
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return root


def cub_classes() -> list[str]:
    return sorted(c for split in SPLITS for c in json.loads("\n".join(packaged_lines("cub", f"{split}.json"))))


def cub_folder(root: Path, per_class: int = 2, size: int = 24) -> Path:
    """``CUB_200_2011/images/<class>/*.jpg`` with ``images.txt`` and ``bounding_boxes.txt``."""
    base = root / "CUB_200_2011"
    lines, boxes = [], []
    for label, name in enumerate(cub_classes()):
        (base / "images" / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            file = f"{name.split('.', 1)[1]}_{i + 1:04d}.jpg"
            class_image(label, i, size).save(base / "images" / name / file, quality=95)
            lines.append(f"{len(lines) + 1} {name}/{file}")
            boxes.append(f"{len(boxes) + 1} 2.0 3.0 {size - 6}.0 {size - 8}.0")
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    (base / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    return root


def image_folder(root: Path, classes: int = 10, per_class: int = 4, size: int = 16, grey_every: int = 3) -> Path:
    """``root/<class>/<image>`` in mixed formats (PNG, JPEG, BMP), some classes grey."""
    formats = ("png", "jpg", "bmp")
    for label in range(classes):
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = class_image(label, i, size, grey=grey_every > 0 and label % grey_every == 0)
            image.save(folder / f"img_{i}.{formats[(label + i) % 3]}")
    return root


def bscd_folders(base: Path, classes: list[str], per_class: int = 4, size: int = 20) -> None:
    """One folder of ``per_class`` JPEGs per class under ``base`` (EuroSAT's, CropDiseases' layout)."""
    for label, name in enumerate(classes):
        (base / name).mkdir(parents=True)
        for i in range(per_class):
            class_image(label, i, size).save(base / name / f"{name}_{i}.jpg")


def write_table(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def chestx_layout(chestx: Path, per_class: int = 4, size: int = 20) -> None:
    """ChestX-ray8's stand-in: Data_Entry_2017.csv and the grey images/ it lists, with three
    findings the benchmark leaves out (Pneumonia, No Finding, and two findings at once)."""
    (chestx / "images").mkdir(parents=True)
    rows = []
    findings = [*CHESTX, "Pneumonia", "No Finding", "Effusion|Mass"]
    for label, finding in enumerate(findings):
        for i in range(per_class):
            name = f"{label:05d}_{i:03d}.png"
            class_image(label, i, size, grey=True).save(chestx / "images" / name)
            rows.append([name, finding, "0", str(i), "58", "M", "PA"])
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender"]
    header.append("View Position")
    write_table(chestx / "Data_Entry_2017.csv", header, rows)


def bscd_fsl(root: Path, per_class: int = 4, size: int = 20) -> Path:
    """BSCD-FSL's four domains under ``root/<domain>``, each in the layout its loader reads."""
    bscd_folders(root / "eurosat" / "2750", EUROSAT, per_class, size)
    crops = [f"Crop___disease_{i:02d}" for i in range(CROP_DISEASES)]
    bscd_folders(root / "crop_diseases" / "dataset" / "train", crops, per_class, size)
    isic = root / "isic"
    (isic / "ISIC2018_Task3_Training_Input").mkdir(parents=True)
    rows = []
    for label in range(len(ISIC)):
        for i in range(per_class):
            name = f"ISIC_{label:02d}{i:05d}"
            class_image(label, i, size).save(isic / "ISIC2018_Task3_Training_Input" / f"{name}.jpg")
            rows.append([name, *("1.0" if c == label else "0.0" for c in range(len(ISIC)))])
    truth = isic / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    write_table(truth, ["image", *ISIC], rows)
    chestx_layout(root / "chestx", per_class, size)
    return root
