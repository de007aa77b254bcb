"""A loss-curve PNG without a plotting library: rasterized into a NumPy image, encoded by hand.

The chart is an (H, W, 3) uint8 RGB array. Data coordinates map to pixels by

    px = left + (x - x0) / (x1 - x0) * (plot_w - 1)
    py = top + (y1 - y) / (y1 - y0) * (plot_h - 1)

where [x0, x1] and [y0, y1] are the data ranges widened to "nice" tick multiples (1, 2 or 5
times a power of ten). Lines are sampled at one point per pixel of their longer extent and each
point is stamped with a small square (line width) or disk (marker). Text comes from the 5x7
bitmap font below, scaled by pixel repetition.

The PNG is one IHDR (8-bit RGB), one zlib-compressed IDAT of rows each prefixed by filter type
0 (None), and IEND; every chunk carries the CRC-32 of its type and data (PNG spec, section 5).
Non-finite points are skipped; an empty validation list, a single point and a constant loss
still give a readable chart.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lorakit.io import atomic_write

WIDTH, HEIGHT = 800, 480
TRAIN_RGB = (31, 119, 180)  # blue
VALID_RGB = (230, 97, 0)  # orange
_TEXT_RGB, _AXIS_RGB, _GRID_RGB, _BG_RGB = (30, 30, 30), (90, 90, 90), (228, 228, 228), (255, 255, 255)
_SCALE = 2  # font pixels per glyph pixel: 10x14 glyphs

# One glyph per line: the character, a space, then its rows as 2 hex digits each (bit 4 = left):
# 7 rows down to the baseline, and an 8th for the descenders of g, j, p, q, y.
_GLYPH_ROWS = """\
  00000000000000
! 04040404000004
" 0A0A0A00000000
# 0A0A1F0A1F0A0A
$ 040F140E051E04
% 18190204081303
& 0C12140815120D
' 0C040800000000
( 02040808080402
) 08040202020408
* 0004150E150400
+ 0004041F040400
, 000000000C0408
- 0000001F000000
. 00000000000C0C
/ 00010204081000
0 0E11131519110E
1 040C040404040E
2 0E11010204081F
3 1F02040201110E
4 02060A121F0202
5 1F101E0101110E
6 0608101E11110E
7 1F010204080808
8 0E11110E11110E
9 0E11110F01020C
: 000C0C000C0C00
; 000C0C000C0408
< 02040810080402
= 00001F001F0000
> 08040201020408
? 0E110102040004
@ 0E11010D15150E
A 0E1111111F1111
B 1E11111E11111E
C 0E11101010110E
D 1C12111111121C
E 1F10101E10101F
F 1F10101E101010
G 0E11101711110F
H 1111111F111111
I 0E04040404040E
J 0702020202120C
K 11121418141211
L 1010101010101F
M 111B1515111111
N 11111915131111
O 0E11111111110E
P 1E11111E101010
Q 0E11111115120D
R 1E11111E141211
S 0F10100E01011E
T 1F040404040404
U 1111111111110E
V 11111111110A04
W 1111111515150A
X 11110A040A1111
Y 1111110A040404
Z 1F01020408101F
[ 0E08080808080E
\\ 00100804020100
] 0E02020202020E
^ 040A1100000000
_ 0000000000001F
` 08040200000000
a 00000E010F110F
b 1010161911111E
c 00000E1010110E
d 01010D1311110F
e 00000E111F100E
f 0609081C080808
g 00000F11110F010E
h 10101619111111
i 04000C0404040E
j 020006020202120C
k 10101214181412
l 0C04040404040E
m 00001A15151111
n 00001619111111
o 00000E1111110E
p 00001E11111E1010
q 00000F11110F0101
r 00001619101010
s 00000E100E011E
t 08081C08080906
u 0000111111130D
v 00001111110A04
w 0000111115150A
x 0000110A040A11
y 00001111110F010E
z 00001F0204081F
{ 02040408040402
| 04040404040404
} 08040402040408
~ 00000815020000
"""


def _parse_font(table: str) -> dict[str, np.ndarray]:
    font = {}
    for line in table.splitlines():
        char, rows = line[0], bytes.fromhex(line[2:])
        assert len(rows) in (7, 8), f"glyph {char!r} has {len(rows)} rows"
        rows = rows.ljust(8, b"\0")
        font[char] = np.array([[(row >> (4 - col)) & 1 for col in range(5)] for row in rows], dtype=bool)  # (8, 5)
    return font


_FONT = _parse_font(_GLYPH_ROWS)


def loss_curve_png(path: str | os.PathLike, train: Iterable[tuple[float, float]],
                   valid: Iterable[tuple[float, float]], title: str) -> Path:
    """Write the train curve (line) and validation curve (line and markers) as a PNG at `path`."""
    png = encode_png(render_loss_curve(train, valid, title))
    return atomic_write(Path(path).expanduser(), lambda tmp: tmp.write_bytes(png))


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 RGB image."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_png takes an (H, W, 3) uint8 image, got {image.dtype} of shape {image.shape}")
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)  # filter 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b""))


def render_loss_curve(train: Iterable[tuple[float, float]], valid: Iterable[tuple[float, float]],
                      title: str) -> np.ndarray:
    """The chart as a (HEIGHT, WIDTH, 3) uint8 RGB image."""
    train, valid = _finite_points(train, "train"), _finite_points(valid, "valid")
    both = np.concatenate([train, valid])
    if len(both):
        x_ticks = _fitting_x_ticks(both[:, 0].min(), both[:, 0].max())
        y_lo, y_hi = both[:, 1].min(), both[:, 1].max()
        pad = 0.03 * (y_hi - y_lo) if y_hi > y_lo else (abs(y_lo) * 0.05 or 0.5)  # a constant loss is centred
        low = max(y_lo - pad, 0.0) if y_lo > 0 else y_lo - pad  # no negative ticks under positive losses
        y_ticks = _nice_ticks(low, y_hi + pad, max_ticks=8)
    else:
        x_ticks, y_ticks = _nice_ticks(0, 1, 2, whole=True), _nice_ticks(0, 1, 6)
    x_labels, y_labels = _tick_labels(x_ticks), _tick_labels(y_ticks)

    glyph_h = 7 * _SCALE
    left = 10 + glyph_h + 10 + max(_text_width(s) for s in y_labels) + 10  # "loss", gap, tick labels, tick
    right = 16 + _text_width(x_labels[-1]) // 2
    top, bottom = 16 + glyph_h + 14, 10 + glyph_h + 10 + glyph_h + 12  # title | tick labels, "step"
    plot_w, plot_h = WIDTH - left - right, HEIGHT - top - bottom

    def to_px(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xs = left + (points[:, 0] - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (plot_w - 1)
        ys = top + (y_ticks[-1] - points[:, 1]) / (y_ticks[-1] - y_ticks[0]) * (plot_h - 1)
        return np.rint(xs).astype(int), np.rint(ys).astype(int)

    img = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    img[:] = _BG_RGB
    tick_xs, _ = to_px(np.stack([x_ticks, np.full_like(x_ticks, y_ticks[0])], axis=1))
    _, tick_ys = to_px(np.stack([np.full_like(y_ticks, x_ticks[0]), y_ticks], axis=1))
    for x, label in zip(tick_xs, x_labels):
        img[top:top + plot_h, x] = _GRID_RGB
        img[top + plot_h:top + plot_h + 5, x] = _AXIS_RGB
        _draw_text(img, label, x, top + plot_h + 10, ha="center")
    for y, label in zip(tick_ys, y_labels):
        img[y, left:left + plot_w] = _GRID_RGB
        img[y, left - 5:left] = _AXIS_RGB
        _draw_text(img, label, left - 10, y - glyph_h // 2, ha="right")
    img[top:top + plot_h, [left, left + plot_w - 1]] = _AXIS_RGB  # frame
    img[[top, top + plot_h - 1], left:left + plot_w] = _AXIS_RGB

    if len(train):
        xs, ys = to_px(train)
        _stamp(img, *_polyline(xs, ys), _square(2), TRAIN_RGB)
        if len(train) == 1:  # a lone point draws no line
            _stamp(img, xs, ys, _disk(3), TRAIN_RGB)
    if len(valid):
        xs, ys = to_px(valid)
        _stamp(img, *_polyline(xs, ys), _square(1), VALID_RGB)
        _stamp(img, xs, ys, _disk(4), VALID_RGB)
    if not len(both):
        _draw_text(img, "no finite losses", left + plot_w // 2, top + plot_h // 2 - glyph_h // 2, ha="center")

    _draw_text(img, _fit(title, WIDTH - 20), WIDTH // 2, 16, ha="center")
    _draw_text(img, "step", left + plot_w // 2, HEIGHT - 12 - glyph_h, ha="center")
    loss_label = np.rot90(_text_mask("loss"))  # reads bottom to top
    _blit(img, loss_label, 10, top + (plot_h - loss_label.shape[0]) // 2, _TEXT_RGB)
    entries = [(name, rgb, marker) for name, rgb, marker, points in
               [("train", TRAIN_RGB, False, train), ("valid", VALID_RGB, True, valid)] if len(points)]
    if entries:
        _draw_legend(img, entries, right_x=left + plot_w - 10, top_y=top + 10)
    return img


def _finite_points(points: Iterable[tuple[float, float]], name: str) -> np.ndarray:
    """(n, 2) float64 of (step, loss), rows with a NaN or infinity dropped, sorted by step."""
    points = list(points)
    try:
        array = np.asarray(points, dtype=np.float64).reshape(-1, 2) if points else np.empty((0, 2))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of (step, loss) pairs, got {points[:3]!r}...") from None
    if len(array) != len(points):
        raise ValueError(f"{name} must be a list of (step, loss) pairs, got {points[:3]!r}...")
    array = array[np.isfinite(array).all(axis=1)]
    return array[np.argsort(array[:, 0], kind="stable")]


def _nice_ticks(lo: float, hi: float, max_ticks: int, whole: bool = False) -> np.ndarray:
    """At most `max_ticks` multiples of 1, 2 or 5 times a power of ten, covering [lo, hi]."""
    if hi <= lo:
        lo, hi = (max(lo - 1, 0), hi + 1) if whole and lo >= 0 else (lo - 1, hi + 1)
    exponent = math.floor(math.log10((hi - lo) / max_ticks))
    while True:
        for mantissa in (1, 2, 5):
            step = mantissa * 10.0 ** exponent
            if whole and step < 1:
                continue
            first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
            if last - first + 1 <= max_ticks:
                return np.arange(first, last + 1) * step
        exponent += 1


def _fitting_x_ticks(lo: float, hi: float) -> np.ndarray:
    """Whole-number step ticks with as many labels as fit side by side under the plot."""
    for max_ticks in (11, 9, 7, 5, 4, 3, 2):
        ticks = _nice_ticks(lo, hi, max_ticks, whole=True)
        widest = max(_text_width(s) for s in _tick_labels(ticks))
        if (widest + 24) * len(ticks) <= WIDTH * 3 // 4:
            return ticks
    return ticks


def _tick_labels(ticks: np.ndarray) -> list[str]:
    step = ticks[1] - ticks[0]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [f"{0.0 if abs(t) < step * 1e-6 else t:.{decimals}f}" for t in ticks]  # no "-0.0"


def _polyline(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels along the segments joining consecutive points, one per pixel of the longer extent."""
    px, py = [xs[:1]], [ys[:1]]
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        t = np.linspace(0.0, 1.0, max(abs(x1 - x0), abs(y1 - y0)) + 1)[1:]
        px.append(np.rint(x0 + t * (x1 - x0)).astype(int))
        py.append(np.rint(y0 + t * (y1 - y0)).astype(int))
    return np.concatenate(px), np.concatenate(py)


def _square(size: int) -> tuple[np.ndarray, np.ndarray]:
    dy, dx = np.mgrid[0:size, 0:size] - size // 2
    return dy.ravel(), dx.ravel()


def _disk(radius: int) -> tuple[np.ndarray, np.ndarray]:
    dy, dx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    inside = dx**2 + dy**2 <= radius**2 + radius // 2
    return dy[inside], dx[inside]


def _stamp(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, offsets: tuple[np.ndarray, np.ndarray],
           rgb: tuple[int, int, int]) -> None:
    """Paint the shape `offsets` (dy, dx) centred on every (x, y), clipped to the image."""
    dy, dx = offsets
    all_y, all_x = (ys[:, None] + dy[None, :]).ravel(), (xs[:, None] + dx[None, :]).ravel()
    keep = (all_y >= 0) & (all_y < img.shape[0]) & (all_x >= 0) & (all_x < img.shape[1])
    img[all_y[keep], all_x[keep]] = rgb


def _text_mask(text: str) -> np.ndarray:
    """(8 * _SCALE, 6 * _SCALE * len(text) - _SCALE) bool: glyphs 1 pixel apart; unknown characters as '?'."""
    cells = [np.pad(_FONT.get(c, _FONT["?"]), ((0, 0), (0, 1))) for c in text] or [np.zeros((8, 1), bool)]
    mask = np.concatenate(cells, axis=1)[:, :-1]  # (8, 6 * len - 1)
    return mask.repeat(_SCALE, axis=0).repeat(_SCALE, axis=1)


def _text_width(text: str) -> int:
    return max(1, 6 * len(text) - 1) * _SCALE


def _fit(text: str, width: int) -> str:
    """`text`, cut with '...' where it would be wider than `width` pixels."""
    most = (width // _SCALE + 1) // 6
    return text if len(text) <= most else text[:max(0, most - 3)] + "..."


def _blit(img: np.ndarray, mask: np.ndarray, x: int, y: int, rgb: tuple[int, int, int]) -> None:
    """Paint `mask`'s set pixels with its top-left corner at (x, y), clipped to the image."""
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + mask.shape[0], img.shape[0]), min(x + mask.shape[1], img.shape[1])
    if y1 > y0 and x1 > x0:
        img[y0:y1, x0:x1][mask[y0 - y:y1 - y, x0 - x:x1 - x]] = rgb


def _draw_text(img: np.ndarray, text: str, x: int, y: int, ha: str = "left", rgb=_TEXT_RGB) -> None:
    """Text with its top at `y`, its left edge, centre or right edge (`ha`) at `x`."""
    mask = _text_mask(text)
    x -= {"left": 0, "center": mask.shape[1] // 2, "right": mask.shape[1]}[ha]
    _blit(img, mask, x, y, rgb)


def _draw_legend(img: np.ndarray, entries: list[tuple[str, tuple[int, int, int], bool]],
                 right_x: int, top_y: int) -> None:
    """A framed box whose top-right corner is (right_x, top_y): a line sample (and marker) per entry."""
    row_h, sample_w, pad = 7 * _SCALE + 8, 28, 8
    box_w = pad + sample_w + 8 + max(_text_width(label) for label, _, _ in entries) + pad
    box_h = pad + row_h * len(entries) - 8 + pad
    x0, y0 = right_x - box_w, top_y
    img[y0:y0 + box_h, x0:x0 + box_w] = _BG_RGB
    img[[y0, y0 + box_h - 1], x0:x0 + box_w] = _AXIS_RGB
    img[y0:y0 + box_h, [x0, x0 + box_w - 1]] = _AXIS_RGB
    for i, (label, rgb, marker) in enumerate(entries):
        text_y = y0 + pad + i * row_h
        mid_y = text_y + 7 * _SCALE // 2
        xs = np.arange(x0 + pad, x0 + pad + sample_w)
        _stamp(img, xs, np.full_like(xs, mid_y), _square(1 if marker else 2), rgb)
        if marker:
            _stamp(img, np.array([x0 + pad + sample_w // 2]), np.array([mid_y]), _disk(4), rgb)
        _draw_text(img, label, x0 + pad + sample_w + 8, text_y)
