"""ImageFolder: one subfolder per class, torchvision's convention.

    root/cat/0001.jpg
    root/cat/nested/0002.png
    root/dog/0003.jpeg

Classes are the subfolder names, sorted (class i = i-th name); every file below a class folder
(recursively, sorted paths) whose extension is an image extension (`IMAGE_EXTENSIONS`, any case) is
one example of that class. Other files are skipped, as in torchvision. A class folder with no image
is an error: its index would exist with no example, which is almost always a copying mistake.
Folders whose name starts with "." (.ipynb_checkpoints, .git) are not classes.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.data.images import IMAGE_EXTENSIONS, FileImages, is_image_file


def read_image_folder(root: str | Path) -> FileImages:
    """The images under `root`, labelled by their class subfolder; decoded lazily on access."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory; an ImageFolder dataset is a folder with one subfolder per class")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class subfolders; put each class's images in root/<class name>/")
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = sorted(
            Path(folder) / f
            for folder, _, files in os.walk(root / name, followlinks=True)
            for f in files
            if is_image_file(Path(f))
        )
        if not found:
            empty.append(name)
        paths += found
        labels += [label] * len(found)
    if empty:
        raise ValueError(f"{root}: class folders {empty} hold no image file ({', '.join(IMAGE_EXTENSIONS)}); "
                         "add images or remove the folders")
    return FileImages(paths, labels, tuple(classes))
