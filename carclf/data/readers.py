"""Readers for the two supported input layouts; both give the same ``SourceDataset`` of image records.

1. Stanford Cars (detected by a ``devkit/`` folder)::

       root/cars_train/*.jpg, root/cars_test/*.jpg
       root/devkit/cars_meta.mat               class_names (1 x C cell)
       root/devkit/cars_train_annos.mat        annotations: bbox_x1, bbox_y1, bbox_x2, bbox_y2, class (1-based), fname
       root/cars_test_annos_withlabels.mat     the same for the test photos (also accepted inside devkit/)

   Boxes are the devkit's 1-based inclusive pixel coordinates; records carry them as 0-based
   ``(x1, y1, x2, y2)`` with an exclusive end (``x1 = bbox_x1 - 1``, ``x2 = bbox_x2``). Kaggle's re-upload
   nests the folders (``cars_train/cars_train/``); that is accepted too.

2. Folder per class (bring your own photos)::

       root/train/<class name>/*.jpg and root/test/<class name>/*.jpg   (optionally root/val/<class name>/)
       root/<class name>/*.jpg        the test split is carved out per class by ``test_fraction`` (seeded)

   Class names are the folder names, sorted; labels are their 0-based positions. No boxes (``bbox=None``:
   the whole photo is the object).

Problems with the layout itself (missing annotation file, no class folders, an empty class, a class id out
of range) raise ``DataLayoutError`` with one line naming the file and the problem. Problems with single
photos (corrupt, unreadable, missing) are left to ``preprocess``, which skips and counts them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
STANFORD_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
VAL_SPLIT_NAMES = ("val", "valid", "validation")

BBox = tuple[int, int, int, int]


class DataLayoutError(ValueError):
    """The input folder is not a usable dataset; the message names the file or folder and the problem."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    path: pathlib.Path
    label: int  # 0-based index into SourceDataset.class_names
    bbox: BBox | None = None  # 0-based (x1, y1, x2, y2), exclusive end, source pixels; None = whole photo


@dataclasses.dataclass
class SourceDataset:
    root: pathlib.Path
    layout: str  # "stanford" | "folders-split" | "folders"
    class_names: list[str]
    splits: dict[str, list[ImageRecord]]  # "train", "test" and, if the layout has one, "val"
    ignored_files: list[pathlib.Path] = dataclasses.field(default_factory=list)  # not image files

    def records(self) -> Iterator[tuple[str, ImageRecord]]:
        for split, records in self.splits.items():
            for record in records:
                yield split, record

    def class_counts(self, split: str) -> np.ndarray:
        counts = np.zeros(len(self.class_names), dtype=np.int64)
        for record in self.splits.get(split, []):
            counts[record.label] += 1
        return counts


def detect_layout(root: os.PathLike | str) -> str:
    root = pathlib.Path(root)
    if not root.exists():
        raise DataLayoutError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataLayoutError(f"{root}: not a folder (expected Stanford Cars or a folder per class)")
    if (root / "devkit").is_dir():
        return "stanford"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folders-split"
    return "folders"


def read_dataset(root: os.PathLike | str, test_fraction: float = 0.2, seed: int = 0) -> SourceDataset:
    """Read ``root`` in whichever layout it has. ``test_fraction`` only applies to ``root/<class>/`` folders."""
    layout = detect_layout(root)
    if layout == "stanford":
        return read_stanford(root)
    return read_folders(root, test_fraction=test_fraction, seed=seed)


# ----------------------------------------------------------------------------------------------------------
# Stanford Cars
# ----------------------------------------------------------------------------------------------------------
def _loadmat(path: pathlib.Path, key: str):
    import scipy.io

    if not path.exists():
        raise DataLayoutError(f"{path}: annotation file missing")
    try:
        contents = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises several types for non-MAT files
        raise DataLayoutError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {exc})") from None
    if key not in contents:
        found = ", ".join(k for k in contents if not k.startswith("__")) or "nothing"
        raise DataLayoutError(f"{path}: no '{key}' variable (found {found})")
    return contents[key]


def _cell_string(value) -> str:
    array = np.asarray(value)
    if array.size == 0:
        return ""
    return str(array.reshape(-1)[0]).strip()


def _cell_number(value, path: pathlib.Path, row: int, field: str) -> int:
    array = np.asarray(value).reshape(-1)
    if array.size != 1:
        raise DataLayoutError(f"{path}: row {row + 1}: field '{field}' is not a single number")
    return int(array[0])


def read_stanford_class_names(meta_path: os.PathLike | str) -> list[str]:
    """Class names from ``cars_meta.mat`` (1 x C cell), in class-id order."""
    meta_path = pathlib.Path(meta_path)
    cell = _loadmat(meta_path, "class_names")
    names = [_cell_string(v) for v in np.asarray(cell).reshape(-1)]
    if not names:
        raise DataLayoutError(f"{meta_path}: 'class_names' is empty")
    for i, name in enumerate(names):
        if not name:
            raise DataLayoutError(f"{meta_path}: class {i + 1} has an empty name")
    return names


def read_stanford_annotations(
    annos_path: os.PathLike | str, image_dir: os.PathLike | str, num_classes: int
) -> list[ImageRecord]:
    annos_path, image_dir = pathlib.Path(annos_path), pathlib.Path(image_dir)
    structs = np.asarray(_loadmat(annos_path, "annotations")).reshape(-1)
    names = structs.dtype.names or ()
    missing = [f for f in STANFORD_FIELDS if f not in names]
    if missing:
        hint = ""
        if "class" in missing and len(missing) == 1:
            hint = (
                "; the test labels were released separately as cars_test_annos_withlabels.mat: "
                "put that file in the dataset root"
            )
        raise DataLayoutError(f"{annos_path}: annotations lack field(s) {', '.join(missing)}{hint}")
    records = []
    for row, item in enumerate(structs):
        class_id = _cell_number(item["class"], annos_path, row, "class")
        if not 1 <= class_id <= num_classes:
            raise DataLayoutError(
                f"{annos_path}: row {row + 1}: class {class_id} is outside 1..{num_classes} (cars_meta.mat)"
            )
        x1, y1, x2, y2 = (_cell_number(item[f], annos_path, row, f) for f in STANFORD_FIELDS[:4])
        fname = _cell_string(item["fname"])
        if not fname:
            raise DataLayoutError(f"{annos_path}: row {row + 1}: empty fname")
        # Devkit boxes are MATLAB 1-based and inclusive: 0-based start, exclusive end.
        records.append(ImageRecord(image_dir / fname, class_id - 1, (x1 - 1, y1 - 1, x2, y2)))
    return records


def _stanford_image_dir(root: pathlib.Path, name: str) -> pathlib.Path:
    folder = root / name
    if (folder / name).is_dir():  # Kaggle's copy nests cars_train/cars_train/
        return folder / name
    if not folder.is_dir():
        raise DataLayoutError(f"{folder}: image folder missing (Stanford Cars layout: {root}/devkit exists)")
    return folder


def read_stanford(root: os.PathLike | str) -> SourceDataset:
    root = pathlib.Path(root)
    devkit = root / "devkit"
    names = read_stanford_class_names(devkit / "cars_meta.mat")
    train = read_stanford_annotations(
        devkit / "cars_train_annos.mat", _stanford_image_dir(root, "cars_train"), len(names)
    )
    test_annos = root / "cars_test_annos_withlabels.mat"
    if not test_annos.exists() and (devkit / test_annos.name).exists():
        test_annos = devkit / test_annos.name
    if not test_annos.exists():
        raise DataLayoutError(
            f"{root / test_annos.name}: annotation file missing (the labelled test annotations; "
            f"devkit/cars_test_annos.mat has no labels)"
        )
    test = read_stanford_annotations(test_annos, _stanford_image_dir(root, "cars_test"), len(names))
    dataset = SourceDataset(root=root, layout="stanford", class_names=names, splits={"train": train, "test": test})
    _check_classes_present(dataset)
    return dataset


# ----------------------------------------------------------------------------------------------------------
# Folder per class
# ----------------------------------------------------------------------------------------------------------
def _visible_dirs(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(folder: pathlib.Path, ignored: list[pathlib.Path]) -> list[pathlib.Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(path)
        else:
            ignored.append(path)
    return files


def _read_class_folders(split_dir: pathlib.Path, ignored: list[pathlib.Path]) -> dict[str, list[pathlib.Path]]:
    classes = {d.name: _class_files(d, ignored) for d in _visible_dirs(split_dir)}
    loose = [p for p in split_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        log.warning(
            "%s: %d image(s) directly in the folder ignored (photos belong in a folder per class), e.g. %s",
            split_dir,
            len(loose),
            sorted(loose)[0].name,
        )
    return classes


def read_folders(root: os.PathLike | str, test_fraction: float = 0.2, seed: int = 0) -> SourceDataset:
    root = pathlib.Path(root)
    layout = detect_layout(root)
    ignored: list[pathlib.Path] = []
    if layout == "folders-split":
        per_split = {
            "train": _read_class_folders(root / "train", ignored),
            "test": _read_class_folders(root / "test", ignored),
        }
        for name in VAL_SPLIT_NAMES:
            if (root / name).is_dir():
                per_split["val"] = _read_class_folders(root / name, ignored)
                break
        names = sorted(per_split["train"])
        if not names:
            raise DataLayoutError(f"{root / 'train'}: no class folders (expected train/<class name>/*.jpg)")
        for split, classes in per_split.items():
            extra = sorted(set(classes) - set(names))
            if extra:
                raise DataLayoutError(
                    f"{root / split / extra[0]}: class '{extra[0]}' has no folder under {root / 'train'}"
                )
        index = {name: i for i, name in enumerate(names)}
        splits = {
            split: [ImageRecord(path, index[name]) for name in sorted(classes) for path in classes[name]]
            for split, classes in per_split.items()
        }
        for name in names:
            if not per_split["train"][name]:
                raise DataLayoutError(f"{root / 'train' / name}: class folder has no images")
    else:
        classes = _read_class_folders(root, ignored)
        names = sorted(classes)
        if not names:
            raise DataLayoutError(
                f"{root}: no class folders (expected <class name>/*.jpg, train/ and test/ folders, "
                f"or the Stanford Cars layout with devkit/)"
            )
        for name in names:
            if not classes[name]:
                raise DataLayoutError(f"{root / name}: class folder has no images")
        records = [ImageRecord(path, label) for label, name in enumerate(names) for path in classes[name]]
        train, test = stratified_split(records, test_fraction, seed)
        splits = {"train": train, "test": test}
    if ignored:
        log.warning("%s: ignored %d file(s) that are not images by extension, e.g. %s", root, len(ignored), ignored[0])
    dataset = SourceDataset(root=root, layout=layout, class_names=names, splits=splits, ignored_files=ignored)
    _check_classes_present(dataset)
    return dataset


# ----------------------------------------------------------------------------------------------------------
# Splitting and checks
# ----------------------------------------------------------------------------------------------------------
def stratified_split(
    records: Sequence[ImageRecord], fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split off ``fraction`` of every class (seeded); returns (kept, taken), each in the input order.

    Each class with at least two images gives at least one to ``taken`` (when ``fraction`` > 0) and keeps
    at least one; a class with a single image keeps it.
    """
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(int(seed))
    by_class: dict[int, list[int]] = {}
    for i, record in enumerate(records):
        by_class.setdefault(record.label, []).append(i)
    taken_rows = set()
    for label in sorted(by_class):
        rows = by_class[label]
        n = len(rows)
        k = min(max(int(round(n * float(fraction))), 1), n - 1) if fraction > 0 and n >= 2 else 0
        if k:
            taken_rows.update(rows[j] for j in rng.permutation(n)[:k])
    kept = [r for i, r in enumerate(records) if i not in taken_rows]
    taken = [r for i, r in enumerate(records) if i in taken_rows]
    return kept, taken


def _check_classes_present(dataset: SourceDataset) -> None:
    train_counts = dataset.class_counts("train")
    empty = [dataset.class_names[i] for i in np.flatnonzero(train_counts == 0)]
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DataLayoutError(f"{dataset.root}: class '{empty[0]}'{more} has no training images")
    test_counts = dataset.class_counts("test")
    if dataset.splits.get("test") and (test_counts == 0).any():
        missing = [dataset.class_names[i] for i in np.flatnonzero(test_counts == 0)]
        log.warning("%s: %d class(es) have no test images, e.g. '%s'", dataset.root, len(missing), missing[0])
