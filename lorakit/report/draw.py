"""Pictures of predictions: detection boxes drawn on an image (Pillow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


def draw_boxes(image: np.ndarray, found: list[tuple], path: str | Path | None = None, scale: int = 1):
    """`image` (uint8 H, W, 3) with each detection (class name, score, (x1, y1, x2, y2)) drawn as a box and a
    "name score" label, one colour per class name; written to `path` (PNG) when given. `scale` enlarges a
    small image first (nearest neighbour) so the labels stay readable. Returns the Pillow image."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as e:
        raise ImportError("drawing boxes needs Pillow: pip install pillow") from e
    picture = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    names = sorted({name for name, _, _ in found})
    for name, score, box in found:
        colour = PALETTE[names.index(name) % len(PALETTE)]
        x1, y1, x2, y2 = (v * scale for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=max(1, scale))
        label = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), label)
        lift = bottom - top + 2
        draw.rectangle((x1, y1 - lift, x1 + right - left + 2, y1), fill=colour)
        draw.text((x1 + 1, y1 - lift), label, fill=(255, 255, 255))
    if path is not None:
        from lorakit.io import atomic_write

        atomic_write(Path(path), lambda tmp: picture.save(tmp, format="PNG"))
    return picture
