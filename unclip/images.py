"""Image preprocessing shared by the embedding ETL and every caller that embeds an image.

The ETL (``pipelines.decode``) turns an image into CLIP input pixels with ``to_rgb`` and
``square``; the manipulations (library, CLI, Serve) use the same two functions
(``clip_pixels``), so an uploaded image gets the CLIP image embedding the decoder was trained
on, and not one of a shrunk copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # the ETL's driver reads images without importing torch
    from torch import Tensor


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (alpha composited on white, 16-bit scaled)."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit PNG/TIFF greyscale opens as I;16 or I: scale the full 16-bit range
        scale = 255.0 / 65535.0 if img.mode != "F" or arr.max() > 255 else 1.0
        grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        img = Image.fromarray(grey, mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def square(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square, resized to ``size`` x ``size`` (bicubic, antialiased)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    box = (left, top, left + s, top + s)
    if s == size:
        return img.crop(box) if (w, h) != (s, s) else img
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def uint8_to_tensor(pixels: np.ndarray) -> Tensor:
    """(N, S, S, 3) or (S, S, 3) uint8 -> (N, 3, S, S) float in [-1, 1]."""
    import torch

    arr = pixels if pixels.ndim == 4 else pixels[None]
    return torch.from_numpy(np.array(arr, copy=True)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def clip_pixels(image: Image.Image, clip_size: int) -> Tensor:
    """An image at any size -> (1, 3, clip_size, clip_size) in [-1, 1], prepared exactly as
    the embedding ETL prepares the images whose CLIP embeddings the decoder was trained on
    (EXIF rotation, RGB, centre square, one bicubic resize to CLIP's input size)."""
    rgb = to_rgb(ImageOps.exif_transpose(image))
    return uint8_to_tensor(np.asarray(square(rgb, clip_size), dtype=np.uint8))
