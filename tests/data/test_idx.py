"""IDX files (raw and gzipped, written here byte by byte) and Debian's Fashion-MNIST."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from lorakit.data.fashion_mnist import (
    COARSE_CLASSES, COARSE_GROUPS, FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, coarse, coarse_labels, load_fashion_mnist,
)
from lorakit.data.idx import read_idx, read_idx_pair


def idx_bytes(array: np.ndarray, type_byte: int) -> bytes:
    header = bytes([0, 0, type_byte, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_uint8_and_big_endian_int32(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    for name, array, t in (("i", images, 0x08), ("n", ints, 0x0C)):
        data = idx_bytes(array, t)
        (tmp_path / name).write_bytes(gzip.compress(data) if gz else data)
    assert np.array_equal(read_idx(tmp_path / "i"), images)
    assert read_idx(tmp_path / "n").tolist() == [1, -2, 70000]


def test_truncated_and_foreign_files_are_clear_errors(tmp_path):
    data = idx_bytes(np.zeros((2, 3, 3), np.uint8), 0x08)
    (tmp_path / "short").write_bytes(data[:-1])
    with pytest.raises(ValueError, match=r"short: 33 bytes, but the header's shape \(2, 3, 3\).* needs 34"):
        read_idx(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="png: not an IDX file"):
        read_idx(tmp_path / "png")


def test_pair_checks_counts_and_label_range(tmp_path):
    (tmp_path / "img").write_bytes(idx_bytes(np.zeros((3, 2, 2), np.uint8), 0x08))
    (tmp_path / "lab").write_bytes(idx_bytes(np.array([0, 1, 5], np.uint8), 0x08))
    (tmp_path / "two").write_bytes(idx_bytes(np.array([0, 1], np.uint8), 0x08))
    with pytest.raises(ValueError, match=r"label 5 at index 2 is outside 0..1"):
        read_idx_pair(tmp_path / "img", tmp_path / "lab", ("a", "b"))
    with pytest.raises(ValueError, match="expected 3 labels"):
        read_idx_pair(tmp_path / "img", tmp_path / "two", ("a", "b"))
    ds = read_idx_pair(tmp_path / "img", tmp_path / "lab", tuple("abcdef"))
    assert len(ds) == 3 and ds[2][1] == 5 and ds[0][0].shape == (2, 2)


needs_fashion_mnist = pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="sudo apt install dataset-fashion-mnist")


@needs_fashion_mnist
def test_fashion_mnist_splits_are_balanced_28x28():
    test = load_fashion_mnist("test")
    assert test.images.shape == (10_000, 28, 28) and test.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert test.classes == FASHION_MNIST_CLASSES
    assert test.labels[:5].tolist() == [9, 2, 1, 1, 6]  # the first test items: ankle boot, pullover, trouser, trouser, shirt
    with pytest.raises(ValueError, match="split 'val'"):
        load_fashion_mnist("val")


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_fashion_mnist("test", root=tmp_path)


def test_coarse_groups_cover_every_class_once():
    members = [m for group in COARSE_CLASSES for m in COARSE_GROUPS[group]]
    assert sorted(members) == sorted(FASHION_MNIST_CLASSES)
    assert coarse_labels(np.arange(10)).tolist() == [0, 1, 0, 1, 0, 2, 0, 2, 3, 2]
    with pytest.raises(ValueError, match="0..9"):
        coarse_labels(np.array([10]))


@needs_fashion_mnist
def test_coarse_dataset_counts():
    ds = coarse(load_fashion_mnist("test"))
    assert ds.classes == COARSE_CLASSES
    assert np.bincount(ds.labels).tolist() == [4000, 2000, 3000, 1000]
