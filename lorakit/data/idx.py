"""IDX files, the format of MNIST and Fashion-MNIST (LeCun's "THE IDX FILE FORMAT"), raw or gzipped.

    bytes 0-1   0x00 0x00
    byte  2     element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
    byte  3     number of dimensions d
    4·d bytes   each dimension's size, big-endian uint32
    the rest    the elements, big-endian, C order: images (N, rows, cols), labels (N,)

A classification set is an images file and a labels file (`read_idx_pair`): uint8 (N, rows, cols)
grayscale and int64 labels (N,).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from lorakit.data.images import ArrayImages

_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in IDX file `path` (gzip if the name ends in .gz or the bytes say so)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IDX file not found")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip ({e}); download the file again") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _TYPES:
        raise ValueError(f"{path}: not an IDX file (header {data[:4].hex()}; expected 0000 then a type byte "
                         f"in {[hex(t) for t in _TYPES]} and the number of dimensions)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_TYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, but the header's shape {shape} of {dtype} needs {expected}; "
                         "the file is truncated or not IDX, download it again")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def read_idx_pair(images_path: str | Path, labels_path: str | Path, classes: tuple[str, ...]) -> ArrayImages:
    """An images file (N, rows, cols) uint8 and a labels file (N,) as one classification set."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images (N, rows, cols), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{labels_path}: expected {len(images)} labels (one per image in {images_path}), got shape {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if len(bad):
        raise ValueError(f"{labels_path}: label {labels[bad[0]]} at index {bad[0]} is outside 0..{len(classes) - 1} "
                         f"({len(classes)} classes); check that images and labels are a pair")
    return ArrayImages(images, labels.astype(np.int64), classes)
