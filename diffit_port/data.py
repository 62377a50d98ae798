"""Training images in, sample grids out: the digits set, image folders and .npz arrays (NumPy + Pillow)."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .images import save_grid, to_uint8  # noqa: F401  (re-exported: grids of training samples)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGITS_SPLITS = ("train", "heldout", "all")
# One resampling filter everywhere: Pillow's bilinear, which also antialiases when it shrinks.
RESAMPLE = Image.Resampling.BILINEAR


class DataError(ValueError):
    """A data source that cannot be used: missing, empty, unreadable or of the wrong shape; the message
    names the offending files."""


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A labelled image set held in memory, in model space."""

    images: np.ndarray                 # float32 (N, C, H, W), in [-1, 1] for pixels (floats from .npz as given)
    labels: np.ndarray                 # int64 (N,)
    class_names: tuple[str, ...]       # label i is class_names[i]
    source: str                        # "digits:train", a folder or an .npz path

    def __len__(self) -> int:
        return int(self.images.shape[0])


# --------------------------------------------------------------------------------------------
# Pixel helpers
# --------------------------------------------------------------------------------------------

def _center_square(a: np.ndarray) -> np.ndarray:
    """Crop the last two axes of (..., H, W) to their central min(H, W) square."""
    h, w = a.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return a[..., top:top + s, left:left + s]


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """(N, C, H, W) float32 -> (N, C, size, size): centre square crop, then bilinear per plane."""
    images = _center_square(images)
    if images.shape[-1] == size:
        return np.ascontiguousarray(images, dtype=np.float32)
    out = np.empty(images.shape[:2] + (size, size), dtype=np.float32)
    for n in range(images.shape[0]):
        for c in range(images.shape[1]):
            plane = Image.fromarray(np.ascontiguousarray(images[n, c], dtype=np.float32))  # mode "F"
            out[n, c] = np.asarray(plane.resize((size, size), RESAMPLE), dtype=np.float32)
    return out


def _match_channels(images: np.ndarray, channels: int, what: str) -> np.ndarray:
    """(N, C, H, W) -> (N, channels, H, W): grey is repeated to RGB; RGB becomes luma (ITU-R 601, as
    Pillow's "L"); any other mismatch is an error."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return np.repeat(images, 3, axis=1)
    if c == 3 and channels == 1:
        luma = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(1, 3, 1, 1)
        return (images * luma).sum(axis=1, keepdims=True)
    raise DataError(f"{what} has {c} channels and the model takes {channels}; only 1 <-> 3 is converted")


# --------------------------------------------------------------------------------------------
# Built-in: scikit-learn's 8x8 digits
# --------------------------------------------------------------------------------------------

def digits_heldout_mask(labels: np.ndarray) -> np.ndarray:
    """The fixed split: within each class, in dataset order, every fifth image (positions 4, 9, 14, ...)
    is held out. Stratified, ~20 %, free of any RNG or library version: 1442 train, 355 held out."""
    mask = np.zeros(labels.shape[0], dtype=bool)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        mask[idx[4::5]] = True
    return mask


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) values 0..16 and int64 (1797,) labels. The data ships inside scikit-learn (no
    download); its CSV is read directly when present, which skips importing scikit-learn (~1 s)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float64)                   # 64 pixels, then the label
        return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def load_digits_split(split: str = "train", size: int = 32, channels: int = 1) -> ImageSet:
    """scikit-learn's digits (1797 8x8 images, values 0..16, 10 classes) scaled to [-1, 1] and resized
    bilinearly (Pillow) to size x size. split: "train" (1442), "heldout" (355, see `digits_heldout_mask`)
    or "all"."""
    if split not in DIGITS_SPLITS:
        raise ValueError(f"unknown digits split {split!r}; choose one of {', '.join(DIGITS_SPLITS)}")
    raw, labels = _digits_arrays()
    images = raw.astype(np.float32)[:, None] / 16.0 * 2.0 - 1.0                     # (N, 1, 8, 8)
    if split != "all":
        keep = digits_heldout_mask(labels) == (split == "heldout")
        images, labels = images[keep], labels[keep]
    images = np.clip(resize_images(images, size), -1.0, 1.0)
    images = _match_channels(images, channels, "digits")
    return ImageSet(np.ascontiguousarray(images), labels, tuple(str(k) for k in range(10)), f"digits:{split}")


# --------------------------------------------------------------------------------------------
# Image folders: root/<class name>/<image>
# --------------------------------------------------------------------------------------------

def _list_items(items: list[str], limit: int = 20) -> str:
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return "\n  " + "\n  ".join(items[:limit]) + more


def load_image_folder(root: str | os.PathLike, size: int, channels: int) -> ImageSet:
    """One subfolder per class (labels follow the sorted folder names); each image is converted to "L"
    (1 channel) or "RGB" (3), centre-cropped to a square and resized to size x size. Hidden files and
    files without an image extension are skipped. Raises DataError naming every empty folder or
    unreadable image."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    if channels not in (1, 3):
        raise DataError(f"image folders feed models with 1 or 3 channels, this one takes {channels}")
    mode = "L" if channels == 1 else "RGB"
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"image folder {root} has no class subfolders; put the images in {root}/<class>/")
    files, labels, empty = [], [], []
    for k, d in enumerate(class_dirs):
        found = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            empty.append(str(d))
        files += found
        labels += [k] * len(found)
    if empty:
        raise DataError(f"class folders without images (extensions {', '.join(IMAGE_EXTENSIONS)}):"
                        + _list_items(empty))
    images = np.empty((len(files), channels, size, size), dtype=np.float32)
    bad = []
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                a = np.asarray(im.convert(mode), dtype=np.float32) / 127.5 - 1.0
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            bad.append(f"{f}: {type(e).__name__}: {e}")
            continue
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)                     # (C, H, W)
        images[i] = resize_images(a[None], size)[0]
    if bad:
        raise DataError(f"{len(bad)} unreadable image(s) in {root}:" + _list_items(bad))
    return ImageSet(np.clip(images, -1.0, 1.0), np.asarray(labels, dtype=np.int64),
                    tuple(d.name for d in class_dirs), str(root))


# --------------------------------------------------------------------------------------------
# Arrays: an .npz with `images` and `labels`
# --------------------------------------------------------------------------------------------

def _read_npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of an .npz archive, every failure a DataError (never a hint to unpickle anything)."""
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not an .npz archive (write one with np.savez(path, images=..., labels=...))")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("images", "labels") if k not in z.files]
            if missing:
                raise DataError(f"{path} lacks the array(s) {', '.join(missing)} (it has: {', '.join(z.files)})")
            arrays = []
            for key in ("images", "labels"):
                try:
                    arrays.append(z[key])
                except ValueError:
                    raise DataError(f"{path}: {key} is not a plain numeric array (object arrays are refused; "
                                    "store uint8 or float images and integer labels)") from None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read {path} as an .npz archive: {type(e).__name__}: {e}") from None
    return arrays[0], arrays[1]


def _looks_channels_first(shape: tuple[int, ...]) -> bool:
    """(N, C, H, W) with a small C and a last axis too large to be a channel count."""
    return len(shape) == 4 and shape[1] in (1, 2, 3, 4) and shape[-1] > 4


def load_npz(path: str | os.PathLike, size: int, channels: int) -> ImageSet:
    """`images` channels-last, (N, H, W) or (N, H, W, C) (NHWC), and `labels` (N,) integers >= 0. uint8 images
    are mapped from 0..255 to [-1, 1]; float images are taken as already in model space ([-1, 1] pixels, or
    scaled VAE latents) and used as given. Images are centre-cropped to a square and resized to size x size.
    Channels-first (NCHW) arrays are refused with the transpose that fixes them."""
    path = Path(path)
    raw, labels = _read_npz_arrays(path)
    if _looks_channels_first(raw.shape):
        raise DataError(f"{path}: images have shape {raw.shape}, which looks channels-first (N, C, H, W); store them "
                        "channels-last (N, H, W, C): np.transpose(images, (0, 2, 3, 1))")
    if raw.ndim == 3:
        raw = raw[..., None]
    if raw.ndim != 4 or raw.shape[0] == 0:
        raise DataError(f"{path}: images must be (N, H, W) or (N, H, W, C) (channels last) with N > 0, "
                        f"got {raw.shape}")
    if labels.shape != (raw.shape[0],) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError(f"{path}: labels must be {raw.shape[0]} integers >= 0, got {labels.dtype} {labels.shape}")
    if raw.dtype == np.uint8:
        images = raw.astype(np.float32) / 127.5 - 1.0
    elif np.issubdtype(raw.dtype, np.floating):
        images = raw.astype(np.float32)
        if not np.isfinite(images).all():
            raise DataError(f"{path}: images contain NaN or infinity")
    else:
        raise DataError(f"{path}: images must be uint8 or float, got {raw.dtype}")
    images = _match_channels(images.transpose(0, 3, 1, 2), channels, str(path))
    if raw.dtype != np.uint8 and images.shape[-2:] != (size, size):
        # Float arrays may be latents, which must not be cropped or interpolated: refuse instead.
        raise DataError(f"{path}: float images are {images.shape[-2]}x{images.shape[-1]}, the preset needs "
                        f"{size}x{size}; resize them yourself or store uint8 pixels")
    images = resize_images(images, size)
    names = tuple(str(k) for k in range(int(labels.max()) + 1))
    return ImageSet(images, labels.astype(np.int64), names, str(path))


def load_dataset(spec: str, size: int, channels: int) -> ImageSet:
    """`digits` (the training split), an .npz file, or an image folder."""
    if spec == "digits":
        return load_digits_split("train", size, channels)
    p = Path(spec)
    if p.suffix == ".npz":
        if not p.is_file():
            raise DataError(f"{p} does not exist")
        return load_npz(p, size, channels)
    if p.is_dir():
        return load_image_folder(p, size, channels)
    raise DataError(f"--data {spec!r} is neither 'digits', an .npz file nor an image folder")
