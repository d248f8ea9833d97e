"""Image transforms that imitate a change of scanner, for drift scenarios and their tests.

Each transform takes a batch of grayscale images, ``(n, H, W)`` or ``(n, 1, H, W)``, either
``uint8`` grey levels from 0 to 255 or floats scaled to [0, 1], and returns a new array of the
same shape and dtype. The input is never changed.

``ScannerDrift`` combines them in a fixed order: thicker strokes (a grey dilation), then a
rotation about the image centre, then a shift by whole pixels with a black fill. Inverting the
images is left out on purpose: the validate stage quarantines such images by their mean
intensity, so they would never reach training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def _as_float_batch(images: np.ndarray) -> tuple[np.ndarray, Any, tuple[int, ...]]:
    """Return ``images`` as float32 ``(n, H, W)`` in [0, 1], their dtype and their shape."""
    array = np.asarray(images)
    shape = array.shape
    if array.ndim == 4:
        if shape[1] != 1:
            raise ValueError(
                f"images of shape {shape} have {shape[1]} channels; the transforms expect one "
                "grayscale channel, (n, 1, H, W)"
            )
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"images of shape {shape}: expected (n, H, W) or (n, 1, H, W)")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0, array.dtype, shape
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"images of dtype {array.dtype}: expected uint8 grey levels or floats in [0, 1]"
        )
    return array.astype(np.float32), array.dtype, shape


def _restore(pixels: np.ndarray, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    pixels = np.clip(pixels, 0.0, 1.0)
    if dtype == np.uint8:
        return np.rint(pixels * 255.0).astype(np.uint8).reshape(shape)
    return pixels.astype(dtype).reshape(shape)


def shift_images(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Shift every image ``dx`` pixels right and ``dy`` pixels down; vacated pixels are black.

    Negative values shift left and up. A shift of the full width or height leaves black images.
    """
    pixels, dtype, shape = _as_float_batch(images)
    height, width = pixels.shape[1:]
    out = np.zeros_like(pixels)
    if abs(dx) < width and abs(dy) < height:
        source_rows = slice(max(0, -dy), height - max(0, dy))
        source_cols = slice(max(0, -dx), width - max(0, dx))
        target_rows = slice(max(0, dy), height - max(0, -dy))
        target_cols = slice(max(0, dx), width - max(0, -dx))
        out[:, target_rows, target_cols] = pixels[:, source_rows, source_cols]
    return _restore(out, dtype, shape)


def rotate_images(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate every image by ``degrees`` counter-clockwise about its centre, filling with black.

    Pixels are interpolated bilinearly.
    """
    from scipy import ndimage

    pixels, dtype, shape = _as_float_batch(images)
    rotated = ndimage.rotate(
        pixels, degrees, axes=(2, 1), reshape=False, order=1, mode="constant", cval=0.0
    )
    return _restore(rotated, dtype, shape)


def thicken_strokes(images: np.ndarray, size: int = 2) -> np.ndarray:
    """Thicken the strokes with a grey dilation over a ``size`` x ``size`` square."""
    from scipy import ndimage

    if size < 1:
        raise ValueError(f"size={size!r} is invalid; expected an integer of at least 1")
    pixels, dtype, shape = _as_float_batch(images)
    dilated = ndimage.grey_dilation(pixels, size=(1, size, size))
    return _restore(dilated, dtype, shape)


@dataclasses.dataclass(frozen=True)
class ScannerDrift:
    """Images as a new scanner delivers them: thicker strokes, rotated, then shifted.

    ``stroke_size`` 1 leaves the strokes as they are; ``degrees`` 0 and a shift of 0 skip those
    steps.
    """

    dx: int = 0
    dy: int = 0
    degrees: float = 0.0
    stroke_size: int = 1

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Return the transformed copy of ``images``."""
        out = np.array(images, copy=True)
        if self.stroke_size > 1:
            out = thicken_strokes(out, self.stroke_size)
        if self.degrees:
            out = rotate_images(out, self.degrees)
        if self.dx or self.dy:
            out = shift_images(out, self.dx, self.dy)
        return out

    def describe(self) -> str:
        """Return a short description for logs and results, such as ``shift (3, 2) px``."""
        parts = []
        if self.stroke_size > 1:
            parts.append(f"strokes dilated {self.stroke_size}x{self.stroke_size}")
        if self.degrees:
            parts.append(f"rotated {self.degrees:g} degrees")
        if self.dx or self.dy:
            parts.append(f"shifted ({self.dx}, {self.dy}) px")
        return ", ".join(parts) or "unchanged"
