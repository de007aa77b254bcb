"""The loss-curve PNG: a valid file (signature, chunk CRCs, zlib stream) whose pixels show both curves."""

import math
import struct
import zlib

import numpy as np
import pytest

from lorakit.plot import HEIGHT, TRAIN_RGB, VALID_RGB, WIDTH, encode_png, loss_curve_png, render_loss_curve


def decode_png(data: bytes) -> np.ndarray:
    """A minimal decoder for what lorakit writes: 8-bit RGB, no interlace, filter 0 rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and set(kinds) == {b"IHDR", b"IDAT", b"IEND"}
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * 3)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


def count(img, rgb):
    return int((img == np.array(rgb, np.uint8)).all(axis=-1).sum())


def curves(steps=200):
    train = [(s, 3.0 * math.exp(-s / 60) + 1.0) for s in range(1, steps + 1)]
    valid = [(s, 3.0 * math.exp(-s / 60) + 1.2) for s in range(20, steps + 1, 20)]
    return train, valid


def test_png_is_valid_and_shows_both_curves(tmp_path):
    train, valid = curves()
    path = loss_curve_png(tmp_path / "out" / "loss.png", train, valid, "tiny run (r=8)")
    img = decode_png(path.read_bytes())
    assert img.shape == (HEIGHT, WIDTH, 3)
    assert (img == render_loss_curve(train, valid, "tiny run (r=8)")).all()
    # Far more curve pixels than the legend's samples alone would give.
    assert count(img, TRAIN_RGB) > 500 and count(img, VALID_RGB) > 300
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]  # no temporary file left behind


def test_encode_png_round_trips_pixels():
    img = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    assert (decode_png(encode_png(img)) == img).all()
    with pytest.raises(ValueError, match="uint8"):
        encode_png(img.astype(np.float32))


@pytest.mark.parametrize("train, valid", [
    ([(1, 2.0)], []),  # a single point
    ([(s, 1.5) for s in range(10)], [(9, 1.5)]),  # constant loss
    ([(s, 0.0) for s in range(10)], []),  # constant zero
    ([(1, 3.0), (2, float("nan")), (3, float("inf")), (4, 2.0)], [(2, float("-inf"))]),  # non-finite skipped
    ([], []),  # nothing to draw: axes and a message
    ([(s * 1000, 1e-5 / (s + 1)) for s in range(300)], []),  # long run, tiny losses
])
def test_edge_cases_render(train, valid):
    img = decode_png(encode_png(render_loss_curve(train, valid, "edge")))
    assert img.shape == (HEIGHT, WIDTH, 3)
    # A series with no finite point draws no curve and has no legend entry.
    assert (count(img, TRAIN_RGB) > 0) == any(math.isfinite(y) for _, y in train)
    assert (count(img, VALID_RGB) > 0) == any(math.isfinite(y) for _, y in valid)


def test_bad_points_name_the_series():
    with pytest.raises(ValueError, match="valid must be a list of"):
        render_loss_curve([(1, 2.0)], [(1, 2.0, 3.0)], "bad")
