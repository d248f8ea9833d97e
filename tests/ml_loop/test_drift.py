"""Tests of the scanner-drift image transforms on real digits and on small synthetic images."""

from __future__ import annotations

import numpy as np
import pytest

from ml_loop.drift import ScannerDrift, rotate_images, shift_images, thicken_strokes


def dot(size: int = 9, row: int = 4, col: int = 4) -> np.ndarray:
    image = np.zeros((1, size, size), dtype=np.uint8)
    image[0, row, col] = 255
    return image


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from ml_loop.datasets import load_source
    from ml_loop.spec import load_spec

    return np.asarray(load_source(load_spec("digits")).images[:50])


def test_shift_moves_right_and_down() -> None:
    shifted = shift_images(dot(), dx=2, dy=1)
    assert shifted[0, 5, 6] == 255
    assert shifted.sum() == 255


def test_shift_negative_moves_left_and_up() -> None:
    shifted = shift_images(dot(), dx=-3, dy=-2)
    assert shifted[0, 2, 1] == 255


def test_shift_past_edge_drops_pixels() -> None:
    assert shift_images(dot(row=4, col=8), dx=1, dy=0).sum() == 0


def test_shift_full_width_is_black() -> None:
    assert shift_images(dot(), dx=9, dy=0).sum() == 0


def test_shift_keeps_float_channel_shape() -> None:
    images = dot().astype(np.float32)[:, None] / 255.0
    shifted = shift_images(images, dx=1, dy=1)
    assert shifted.shape == (1, 1, 9, 9)
    assert shifted.dtype == np.float32
    assert shifted[0, 0, 5, 5] == pytest.approx(1.0)


def test_rotate_quarter_turn_counter_clockwise() -> None:
    """A pixel above the centre ends up left of it: counter-clockwise as the image is shown."""
    rotated = rotate_images(dot(row=1, col=4), 90)
    assert rotated[0, 4, 1] == 255
    assert rotated[0, 1, 4] == 0


def test_rotate_zero_is_identity(digits: np.ndarray) -> None:
    assert np.array_equal(rotate_images(digits, 0.0), digits)


def test_thicken_grows_strokes(digits: np.ndarray) -> None:
    thick = thicken_strokes(digits, 2)
    assert (thick >= digits).all()
    assert (thick > 127).sum() > (digits > 127).sum()


def test_thicken_invalid_size() -> None:
    with pytest.raises(ValueError, match="size=0"):
        thicken_strokes(dot(), 0)


def test_transform_rejects_colour() -> None:
    with pytest.raises(ValueError, match="3 channels"):
        shift_images(np.zeros((1, 3, 4, 4), dtype=np.float32), 1, 1)


def test_transform_rejects_integer_dtype() -> None:
    with pytest.raises(ValueError, match="int64"):
        shift_images(np.zeros((1, 4, 4), dtype=np.int64), 1, 1)


def test_scanner_leaves_input_unchanged(digits: np.ndarray) -> None:
    before = digits.copy()
    ScannerDrift(dx=2, dy=2, degrees=15, stroke_size=2).apply(digits)
    assert np.array_equal(digits, before)


def test_scanner_default_is_identity(digits: np.ndarray) -> None:
    assert np.array_equal(ScannerDrift().apply(digits), digits)


@pytest.mark.parametrize(
    "scanner", [ScannerDrift(dx=3, dy=3), ScannerDrift(dx=2, dy=2, degrees=15, stroke_size=2)]
)
def test_scanner_keeps_intensity_in_validation_bounds(scanner: ScannerDrift) -> None:
    """The validate stage quarantines images whose mean grey level is outside [5, 120]."""
    from ml_loop.datasets import load_source
    from ml_loop.spec import load_spec

    spec = load_spec("digits")
    image = spec.dataset.image
    means = scanner.apply(load_source(spec).images).mean(axis=(1, 2))
    assert means.min() >= image.min_mean_intensity
    assert means.max() <= image.max_mean_intensity


def test_scanner_changes_row_profile(digits: np.ndarray) -> None:
    drifted = ScannerDrift(dx=2, dy=2).apply(digits)
    assert drifted[:, :2].sum() == 0
    assert drifted[:, :, :2].sum() == 0


def test_scanner_describe() -> None:
    text = ScannerDrift(dx=2, dy=1, degrees=15, stroke_size=2).describe()
    assert text == "strokes dilated 2x2, rotated 15 degrees, shifted (2, 1) px"
    assert ScannerDrift().describe() == "unchanged"
