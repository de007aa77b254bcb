"""The in-memory form every image reader returns, and reading one image file.

Classification (`ImageFolder`, `ArrayImages`, the IDX / Fashion-MNIST readers):

    len(ds); ds.classes -> tuple[str, ...]
    ds[i] -> (image, label)       image: uint8 numpy (H, W, 3) RGB or (H, W) grayscale; label: int in [0, len(classes))
    ds.labels -> int64 numpy (N,)

Detection (`DetectionImages`, the YOLO reader):

    ds[i] -> (image, boxes, labels)   boxes: float32 (n, 4) pixel (x1, y1, x2, y2); labels: int64 (n,); n may be 0

Images are read with Pillow (`read_image`): decoded to RGB (palette, alpha, CMYK, 16-bit converted),
EXIF orientation applied (what a viewer shows, and what OpenCV's imread and Ultralytics see, so YOLO
boxes drawn on the viewed image fit). Decoding is lazy: a dataset holds paths and reads on access.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# torchvision's ImageFolder extensions (IMG_EXTENSIONS), compared lowercase
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_image(path: str | Path) -> np.ndarray:
    """The image at `path` as uint8 (H, W, 3) RGB, EXIF orientation applied."""
    try:
        from PIL import Image, ImageOps
    except ImportError as e:
        raise ImportError("reading images needs Pillow: pip install pillow") from e
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found; check the dataset's paths") from None
    except (OSError, ValueError, SyntaxError) as e:  # Pillow: UnidentifiedImageError, truncated files, bad headers
        raise ValueError(f"{path}: unreadable image ({e}); re-export or delete the file") from None


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class ArrayImages:
    """A classification set held in memory: images uint8 (N, H, W) or (N, H, W, 3), labels (N,)."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 (N, H, W) or (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < len(self.classes):
            raise ValueError(f"labels span {self.labels.min()}..{self.labels.max()} but there are {len(self.classes)} classes")
        self.classes = tuple(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


@dataclass
class FileImages:
    """A classification set of image files read on access (`ImageFolder` builds one)."""

    paths: list[Path]
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.classes = tuple(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return read_image(self.paths[i]), int(self.labels[i])


@dataclass
class DetectionImages:
    """A detection set: image files read on access, boxes held normalised (YOLO's cx, cy, w, h in 0..1)."""

    paths: list[Path]
    boxes: list[np.ndarray]  # per image float32 (n, 4) normalised cx, cy, w, h
    box_labels: list[np.ndarray]  # per image int64 (n,)
    classes: tuple[str, ...]
    label_files: list[Path | None] = field(default_factory=list)  # where the boxes came from (None: no file)

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        if not (len(self.paths) == len(self.boxes) == len(self.box_labels)):
            raise ValueError(f"{len(self.paths)} images, {len(self.boxes)} box arrays, {len(self.box_labels)} label arrays")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = read_image(self.paths[i])
        return image, to_pixel_xyxy(self.boxes[i], image.shape[1], image.shape[0]), self.box_labels[i]


def to_pixel_xyxy(cxcywh: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised (n, 4) cx, cy, w, h -> pixel (n, 4) x1, y1, x2, y2, clipped to the image."""
    b = np.asarray(cxcywh, dtype=np.float32).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float32)
    xyxy = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1) * scale
    return np.clip(xyxy, 0, scale).astype(np.float32)


def to_normalized_cxcywh(xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel (n, 4) x1, y1, x2, y2 -> normalised (n, 4) cx, cy, w, h (YOLO label values)."""
    b = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    scale = np.array([width, height], dtype=np.float64)
    centre = (b[:, :2] + b[:, 2:]) / 2 / scale
    size = (b[:, 2:] - b[:, :2]) / scale
    return np.concatenate([centre, size], axis=1)
