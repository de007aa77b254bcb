"""The Ultralytics YOLO detection layout, read and written.

    data.yaml                 path: <dataset root>   (relative: to data.yaml's folder; absent: that folder)
                              train: images/train    (folder of images, a .txt list of image paths, or a list of either)
                              val: images/val
                              names: [cat, dog]      (or {0: cat, 1: dog}; `nc`, if given, must equal the count)
    images/train/0001.jpg
    labels/train/0001.txt     one object per line: "class cx cy w h", centre and size normalised to 0..1

An image's label file is its path with the last `images` folder replaced by `labels` and the
extension by .txt (Ultralytics' rule). A missing or empty label file means the image has no object.
Every label line is checked where it is read: a bad line is an error naming file:line and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lorakit.data.images import DetectionImages, is_image_file


def read_yolo(data_yaml: str | Path, split: str = "train") -> DetectionImages:
    """Split `split` of the dataset `data_yaml` describes; labels parsed now, images read on access."""
    data_yaml = Path(data_yaml)
    config = _read_yaml(data_yaml)
    classes = _names(config, data_yaml)
    if split not in config or config[split] in (None, ""):
        raise ValueError(f"{data_yaml}: no {split!r} entry; add e.g. '{split}: images/{split}'")
    root = Path(config.get("path") or ".")
    root = root if root.is_absolute() else data_yaml.parent / root
    images = _image_paths(config[split], root, data_yaml, split)
    boxes, labels, files = [], [], []
    for image in images:
        label_file = label_path(image)
        b, c = read_label_file(label_file, len(classes)) if label_file.is_file() else (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
        boxes.append(b)
        labels.append(c)
        files.append(label_file if label_file.is_file() else None)
    return DetectionImages(images, boxes, labels, classes, files)


def label_path(image: Path) -> Path:
    """images/.../name.ext -> labels/.../name.txt (the last `images` path component)."""
    parts = list(image.parts)
    if "images" not in parts:
        raise ValueError(f"{image}: YOLO images must sit under an 'images' folder so labels/ can be found beside it")
    i = len(parts) - 1 - parts[::-1].index("images")
    parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def read_label_file(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One label file -> (boxes float32 (n, 4) normalised cx, cy, w, h; classes int64 (n,))."""
    boxes, classes = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 5:
            raise ValueError(f"{where}: {len(fields)} numbers in {line.strip()!r}; a detection label line is "
                             "'class cx cy w h' (5 numbers; polygons/segments are not supported)")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise ValueError(f"{where}: {line.strip()!r} is not 5 numbers ('class cx cy w h')") from None
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < num_classes:
            raise ValueError(f"{where}: class id {fields[0]} is not an integer in 0..{num_classes - 1} "
                             f"(data.yaml names {num_classes} classes); fix the id or add the class to names")
        box = values[1:]
        if not all(0.0 <= v <= 1.0 for v in box):
            raise ValueError(f"{where}: coordinates {fields[1:]} are outside 0..1; YOLO labels are normalised "
                             "(divide x and w by the image width, y and h by its height)")
        if box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"{where}: box width and height must be > 0, got w={fields[3]} h={fields[4]}; remove the line")
        boxes.append(box)
        classes.append(int(cls))
    return np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(classes, dtype=np.int64)


def label_text(boxes: np.ndarray, classes: np.ndarray) -> str:
    """A label file's text for normalised (n, 4) cx, cy, w, h boxes and their classes."""
    return "".join(f"{int(c)} {b[0]:.6f} {b[1]:.6f} {b[2]:.6f} {b[3]:.6f}\n" for b, c in zip(boxes, classes))


def data_yaml_text(names: tuple[str, ...], splits: dict[str, str]) -> str:
    """data.yaml for a dataset rooted at data.yaml's folder: `path: .`, the splits, `nc` and `names`."""
    import yaml

    return yaml.safe_dump({"path": ".", **splits, "nc": len(names), "names": list(names)}, sort_keys=False)


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"{path}: data.yaml not found")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping with path, train, val and names")
    return config


def _names(config: dict, data_yaml: Path) -> tuple[str, ...]:
    names = config.get("names")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"{data_yaml}: names as a mapping needs the keys 0..{len(names) - 1}, got {sorted(names)}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise ValueError(f"{data_yaml}: 'names' must be a non-empty list or {{id: name}} mapping, got {names!r}")
    if "nc" in config and config["nc"] != len(names):
        raise ValueError(f"{data_yaml}: nc is {config['nc']} but names lists {len(names)} classes; make them agree")
    return tuple(str(n) for n in names)


def _image_paths(entry, root: Path, data_yaml: Path, split: str) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    paths: list[Path] = []
    for item in entries:
        source = Path(str(item))
        source = source if source.is_absolute() else root / source
        if source.is_dir():
            paths += sorted(Path(d) / f for d, _, files in os.walk(source, followlinks=True) for f in files if is_image_file(Path(f)))
        elif source.is_file() and source.suffix == ".txt":
            for line in source.read_text().splitlines():
                if line.strip():
                    p = Path(line.strip())
                    paths.append(p if p.is_absolute() else source.parent / p)
        else:
            raise FileNotFoundError(f"{data_yaml}: {split} entry {item!r} resolves to {source}, which is neither a "
                                    "folder of images nor a .txt list of image paths")
    if not paths:
        raise ValueError(f"{data_yaml}: the {split} split {entry!r} holds no image")
    return paths
