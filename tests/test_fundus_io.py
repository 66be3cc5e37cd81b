from __future__ import annotations

import gzip
import io
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from scripts.atomic import OutputError
from scripts.fundus_io import (
    FundusImageError,
    _median_filtered_above,
    _median_filtered_sample,
    estimate_fov,
    image_size,
    is_grayscale,
    read_image,
    read_label_mask,
    read_mask,
    readable_image_size,
    write_png,
)

# ImageFolder checks a folder's photographs with readable_image_size before segmenting any: it must accept and refuse
# exactly what read_image does.
READERS = [read_image, readable_image_size]


@pytest.fixture
def rgb8() -> np.ndarray:
    """A small non-square RGB picture with all channels distinct, so channel or axis mix-ups show."""
    rng = np.random.default_rng(0)
    return (rng.random((12, 17, 3)) * 255).astype(np.uint8)


def _save(path: Path, array: np.ndarray, mode: str | None = None, **kwargs) -> Path:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("name", ["a.png", "a.tif", "a.TIFF", "a.bmp", "a.ppm", "a.PNG"])
def test_read_image_lossless_rgb_formats(tmp_path: Path, rgb8: np.ndarray, name: str) -> None:
    path = _save(tmp_path / name, rgb8, format=Image.registered_extensions()[Path(name).suffix.lower()])
    image = read_image(path)
    assert image.shape == (12, 17, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image, rgb8 / 255.0, atol=1e-6)


def test_read_image_jpeg_is_close(tmp_path: Path) -> None:
    smooth = np.zeros((32, 48, 3), np.uint8)
    smooth[..., 0] = np.linspace(50, 200, 48, dtype=np.uint8)[None, :]
    smooth[..., 1] = 90
    smooth[..., 2] = np.linspace(20, 120, 32, dtype=np.uint8)[:, None]
    image = read_image(_save(tmp_path / "a.JPG", smooth, quality=95))
    assert image.shape == (32, 48, 3)
    assert np.abs(image - smooth / 255.0).max() < 0.05


def test_read_image_gzipped_ppm(tmp_path: Path, rgb8: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(rgb8).save(buffer, format="PPM")
    path = tmp_path / "im0001.ppm.gz"
    path.write_bytes(gzip.compress(buffer.getvalue()))
    np.testing.assert_allclose(read_image(path), rgb8 / 255.0, atol=1e-6)


def test_the_header_readers_decompress_a_gz_only_as_far_as_its_header(tmp_path: Path, rgb8: np.ndarray) -> None:
    """image_size and is_grayscale decompressed a whole STARE photograph to read its header (355 ms for an HRF-sized
    .ppm.gz, 0.2 ms now): a .gz cut short after its header proves they stop there, while read_image still refuses it."""
    buffer = io.BytesIO()
    Image.fromarray(rgb8).save(buffer, format="PPM")
    data = gzip.compress(buffer.getvalue())
    path = tmp_path / "im0001.ppm.gz"
    path.write_bytes(data[: len(data) // 2])
    assert image_size(path) == (rgb8.shape[1], rgb8.shape[0]) and is_grayscale(path) is False
    with pytest.raises(FundusImageError) as error:
        read_image(path)
    _assert_clean_error(error, path, "cannot read")
    gray = tmp_path / "red_free.pgm.gz"
    Image.fromarray(rgb8[..., 1]).save(buffer := io.BytesIO(), format="PPM")
    gray.write_bytes(gzip.compress(buffer.getvalue()))
    assert is_grayscale(gray) is True and image_size(gray) == image_size(path)


def test_read_image_ignores_an_alpha_channel_that_hides_everything(tmp_path: Path, rgb8: np.ndarray) -> None:
    alpha = np.zeros(rgb8.shape[:2] + (1,), np.uint8)
    path = _save(tmp_path / "a.png", np.concatenate([rgb8, alpha], axis=-1))
    np.testing.assert_allclose(read_image(path), rgb8 / 255.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_read_image_lays_transparent_pixels_over_black(tmp_path: Path, mode: str) -> None:
    """A photograph cut out with transparency, white under its transparent corners: they read as the dark border
    around a field of view, the FOV estimate leaves them out, and half-transparent pixels are half as bright."""
    size = 120
    rows, cols = np.mgrid[:size, :size]
    inside = np.hypot(rows - size / 2, cols - size / 2) < size / 2 - 4
    retina = np.zeros((size, size, 3), np.uint8)
    retina[...] = (170, 80, 40)
    retina[~inside] = 255
    alpha = np.where(inside, 255, 0).astype(np.uint8)
    alpha[0, 0] = 128
    picture = Image.fromarray(np.dstack([retina, alpha]), "RGBA").convert(mode)
    picture.save(tmp_path / "cut_out.png")
    image = read_image(tmp_path / "cut_out.png")
    opaque = np.asarray(picture.convert("RGB"), np.float32) / 255.0
    np.testing.assert_allclose(image[inside], opaque[inside], atol=1e-6)
    assert image[~inside][1:].max() == 0.0
    np.testing.assert_allclose(image[0, 0], opaque[0, 0] * 128 / 255, atol=1e-6)
    fov = estimate_fov(image)
    assert not fov[~inside].any() and fov[inside].mean() > 0.95


def test_read_image_palette_gif_uses_palette_colours(tmp_path: Path) -> None:
    colours = np.array([[200, 60, 20], [10, 220, 90], [30, 40, 250]], np.uint8)
    indices = np.arange(12 * 17).reshape(12, 17) % 3
    path = _save(tmp_path / "a.gif", colours[indices])
    assert Image.open(path).mode == "P"
    np.testing.assert_allclose(read_image(path), colours[indices] / 255.0, atol=1e-6)


def test_read_image_grayscale_is_replicated(tmp_path: Path, rgb8: np.ndarray) -> None:
    gray = rgb8[..., 1]
    image = read_image(_save(tmp_path / "a.pgm", gray))
    assert image.shape == (12, 17, 3)
    for channel in range(3):
        np.testing.assert_allclose(image[..., channel], gray / 255.0, atol=1e-6)


def test_read_image_16bit_scaled_by_bit_depth(tmp_path: Path) -> None:
    # The maximum used is far below 65535: scaling by the image maximum would wrongly give 1.0.
    values = (np.arange(12 * 17).reshape(12, 17) * 97).astype(np.uint16)
    for name in ("a.png", "a.tif"):
        path = _save(tmp_path / name, values)
        assert Image.open(path).mode.startswith("I;16")
        image = read_image(path)
        np.testing.assert_allclose(image[..., 0], values / 65535.0, atol=1e-6)
        assert image.max() < 0.5
        np.testing.assert_allclose(read_mask(path), np.round(values / 65535.0 * 255), atol=0.51)


def test_read_image_16bit_rgb_tiff(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    values = (np.random.default_rng(1).random((10, 14, 3)) * 65535).astype(np.uint16)
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, values, photometric="rgb")
    # PIL keeps the high byte of each sample: the scale is right, the precision 8 bit.
    np.testing.assert_allclose(read_image(path), values / 65535.0, atol=1 / 255)


def test_read_mask_raw_values(tmp_path: Path) -> None:
    values = np.array([[0, 1, 128, 255]] * 3, np.uint8)
    np.testing.assert_array_equal(read_mask(_save(tmp_path / "m.gif", values)), values)
    np.testing.assert_array_equal(read_mask(_save(tmp_path / "m.bmp", values)), values)
    rgb = np.stack([values, 255 - values, np.full_like(values, 7)], axis=-1)
    mask = read_mask(_save(tmp_path / "m.png", rgb))
    assert mask.shape == (3, 4) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, values)
    bilevel = read_mask(_save(tmp_path / "b.png", values > 100, mode="1"))
    np.testing.assert_array_equal(bilevel, np.where(values > 100, 255, 0))


def test_16bit_masks_holding_8bit_levels_keep_them(tmp_path: Path) -> None:
    """A 16-bit PNG of 0/1 (or 0/128/255) levels: scaled by 255/65535 every level under 129 rounded to 0."""
    levels = np.array([[0, 1, 128, 255]] * 3, np.uint16)
    np.testing.assert_array_equal(read_mask(_save(tmp_path / "levels.png", levels, mode="I;16")), levels)
    full_range = np.array([[0, 257, 32896, 65535]], np.uint16)  # a full-range mask is still scaled
    np.testing.assert_array_equal(read_mask(_save(tmp_path / "full.png", full_range, mode="I;16")), [[0, 1, 128, 255]])
    assert read_label_mask(_save(tmp_path / "binary.png", (levels > 0).astype(np.uint16), mode="I;16")).sum() == 9


def test_a_0_1_vessel_mask_saved_as_jpeg_is_refused_and_low_two_level_masks_are_read(drive_dir: Path, tmp_path) -> None:
    """DRIVE's manual vessels as a 0/1 JPEG come back as 0, 1, 2...: no threshold recovers them (the half-scale one
    read nothing), so the label is refused, naming it; a lossless 0/2 mask reads as its structure."""
    vessels = np.asarray(Image.open(drive_dir / "training" / "1st_manual" / "21_manual1.gif")) > 0
    jpeg = tmp_path / "21_vessels.jpg"
    Image.fromarray(vessels.astype(np.uint8)).save(jpeg, quality=75)
    assert 2 < len(np.unique(read_mask(jpeg))) and read_mask(jpeg).max() < 128
    with pytest.raises(FundusImageError, match=rf"label {jpeg} has \d+ levels from 0 to \d+: a 0/1 mask saved in a lossy"):
        read_label_mask(jpeg)
    two_levels = _save(tmp_path / "two.png", vessels.astype(np.uint8) * 2)
    np.testing.assert_array_equal(read_label_mask(two_levels), vessels)
    as_255 = tmp_path / "21_vessels_255.jpg"
    Image.fromarray(vessels.astype(np.uint8) * 255).save(as_255, quality=75)
    assert (read_label_mask(as_255) == vessels).mean() > 0.99, "a 0/255 JPEG is still thresholded at 127"


def test_a_gray_mask_stored_with_a_faint_tint_reads_as_its_structure(tmp_path: Path) -> None:
    """Within the tint a gray mask may carry (8 levels), whatever channel carries it: a 0/1 mask tinted green has
    no red, which alone read it as empty."""
    mask = np.zeros((40, 60), bool)
    mask[10:20, 5:50] = True
    for name, colour in (("green_0_1.png", (0, 1, 0)), ("green_0_8.png", (0, 8, 0)), ("tinted.png", (250, 255, 250))):
        rgb = np.zeros((40, 60, 3), np.uint8)
        rgb[mask] = colour
        np.testing.assert_array_equal(read_label_mask(_save(tmp_path / name, rgb)), mask, err_msg=name)
    palette = Image.new("P", (60, 40))
    palette.putdata(mask.astype(np.uint8).ravel().tolist())  # indices 0 and 1
    palette.putpalette([4, 2, 4, 252, 254, 252] + [0] * 762)  # DRIVE's 2nd_manual palette
    palette.save(tmp_path / "palette.gif")
    np.testing.assert_array_equal(read_label_mask(tmp_path / "palette.gif"), mask)


def test_drives_second_observer_masks_read_as_their_structure(drive_dir: Path, tmp_path) -> None:
    """DRIVE's 2nd_manual GIFs store gray in a faintly tinted palette (4,2,4 and 252,254,252): until 0.3.17 they were
    refused as colour pictures. The structure is independently the palette entry that is light."""
    gif = drive_dir / "test" / "2nd_manual" / "01_manual2.gif"
    with Image.open(gif) as image:
        assert image.mode == "P"
        palette = np.asarray(image.getpalette()[:6]).reshape(2, 3)
        assert 0 < np.ptp(palette, axis=1).max() <= 8, "the tint this test is about"
        expected = np.asarray(image) == int(np.argmax(palette.sum(axis=1)))
    np.testing.assert_array_equal(read_label_mask(gif), expected)
    assert 0.05 < expected.mean() < 0.2
    green = np.zeros((40, 40, 3), np.uint8)
    green[10:20, :, 1] = 200  # a colour drawing is still refused
    with pytest.raises(FundusImageError, match="is a colour picture whose channels differ"):
        read_label_mask(_save(tmp_path / "green.png", green))


def test_a_jpeg_turned_by_its_exif_orientation_is_read_as_a_viewer_shows_it(tmp_path: Path, caplog) -> None:
    """A camera stores a portrait shot landscape with EXIF Orientation 6 (turn 90 degrees clockwise to view)."""
    stored = np.zeros((100, 200, 3), np.uint8)
    stored[:10, :, 0] = 255  # a red band along the stored top edge
    path = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    with caplog.at_level(logging.WARNING):
        shown = read_image(path)
        read_image(path)
    assert shown.shape == (200, 100, 3)
    assert shown[:, -10:, 0].mean() > 0.9 and shown[:, :10, 0].mean() < 0.1, "the top edge turned to the right"
    assert read_mask(path).shape == (200, 100)
    assert image_size(path) == (100, 200)  # (width, height), as shown
    assert readable_image_size(path) == (200, 100)  # (height, width), as read
    assert caplog.text.count("turned upright as its EXIF orientation (6) says") == 1, "named once, not per read"


def test_a_tiff_turned_by_its_orientation_tag_is_turned_once(tmp_path: Path, caplog) -> None:
    """PIL's TIFF reader turns the picture itself as it decodes and gives its turned size when it opens it: the header
    size was swapped once more, so that a mask of the picture as read was refused, and the turn went unsaid."""
    stored = np.zeros((40, 64, 3), np.uint8)
    stored[:5, :, 0] = 255  # a red band along the stored top edge
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "eye.tif"
    Image.fromarray(stored).save(path, exif=exif)
    with caplog.at_level(logging.WARNING):
        shown = read_image(path)
    assert shown.shape == (64, 40, 3)
    assert shown[:, -5:, 0].mean() > 0.9 and shown[:, :5, 0].mean() < 0.1, "the top edge turned to the right once"
    assert image_size(path) == (40, 64)  # (width, height), as read
    assert "turned upright as its EXIF orientation (6) says" in caplog.text


def test_a_turned_jpeg_with_malformed_exif_is_turned_all_the_same(tmp_path: Path) -> None:
    """A standard tag of another type than EXIF defines (ResolutionUnit as text): PIL's exif_transpose, which rewrites
    the EXIF block, raised struct.error, and an inference folder holding the file stopped at start-up."""
    stored = np.zeros((40, 64, 3), np.uint8)
    stored[:5, :, 0] = 255
    entries = [struct.pack("<HHII", 0x0112, 3, 1, 6), struct.pack("<HHI4s", 0x0128, 2, 4, b"inc\0")]
    block = b"II*\x00" + struct.pack("<IH", 8, len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    path = tmp_path / "turned.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=b"Exif\x00\x00" + block)
    shown = read_image(path)
    assert shown.shape == (64, 40, 3) and shown[:, -5:, 0].mean() > 0.9 and shown[:, :5, 0].mean() < 0.1
    assert image_size(path) == (40, 64)


@pytest.mark.parametrize("reader", [*READERS, read_label_mask])
def test_a_damaged_gzip_or_a_forged_header_is_one_line(tmp_path: Path, rgb8: np.ndarray, reader) -> None:
    """zlib's error on a damaged .gz, and PIL's on a header claiming more pixels than it decodes, went out as
    tracebacks (the header readers let both out: a datalist's check stopped with one)."""
    gzipped = tmp_path / "im0001.ppm.gz"
    buffer = io.BytesIO()
    Image.fromarray(rgb8).save(buffer, "PPM")
    data = bytearray(gzip.compress(buffer.getvalue()))
    data[12] ^= 0xFF  # inside the deflate stream, past gzip's header
    gzipped.write_bytes(bytes(data))
    forged = tmp_path / "huge.png"
    header = struct.pack(">IIBBBBB", 20000, 10000, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 100)
    forged.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + b"".join(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
                   for kind, body in ((b"IHDR", header), (b"IDAT", pixels)))
    )
    for path in (gzipped, forged):
        with pytest.raises(FundusImageError) as error:
            reader(path)
        _assert_clean_error(error, path, "cannot read")
        assert image_size(path) is None and is_grayscale(path) is False


def test_a_label_painted_on_a_transparent_layer_is_read_over_black(tmp_path: Path) -> None:
    """Its hidden pixels kept white under a transparent alpha: read as foreground, the whole picture was the label."""
    painted = np.zeros((64, 64), bool)
    painted[30:34, :] = True
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = np.where(painted, 255, 0)
    gray_alpha = rgba[..., [0, 3]]
    for name, picture in (("rgba.png", Image.fromarray(rgba, "RGBA")), ("la.png", Image.fromarray(gray_alpha, "LA"))):
        picture.save(tmp_path / name)
        np.testing.assert_array_equal(read_label_mask(tmp_path / name), painted)
    rgba[..., 3] = 0  # an alpha that hides everything says nothing: ignored, as for a photograph
    Image.fromarray(rgba, "RGBA").save(tmp_path / "hidden.png")
    assert read_label_mask(tmp_path / "hidden.png").all()


def test_a_lossless_map_of_several_classes_is_named_as_such(tmp_path: Path) -> None:
    classes = np.zeros((64, 64), np.uint8)
    classes[16:48, 16:48] = 1
    classes[24:40, 24:40] = 2
    with pytest.raises(FundusImageError, match=r"classes.png has 3 levels from 0 to 2: .* or a map of several "
                       r"classes \(0 background, 1 disc, 2 cup\); save masks losslessly .* one per structure"):
        read_label_mask(_save(tmp_path / "classes.png", classes))


def _assert_clean_error(error: pytest.ExceptionInfo, path: Path, words: str) -> None:
    message = str(error.value)
    assert str(path) in message and words in message.lower()
    # No PIL traceback chained to the user's error.
    assert error.value.__cause__ is None
    assert error.value.__context__ is None or error.value.__suppress_context__


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.png"
    with pytest.raises(FundusImageError) as error:
        read_image(path)
    _assert_clean_error(error, path, "not found")


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(FundusImageError) as error:
        read_mask(path)
    _assert_clean_error(error, path, "unsupported")


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", ["t.png", "t.gif", "t.tif", "t.jpg", "t.ppm"])
def test_truncated_file(tmp_path: Path, rgb8: np.ndarray, name: str, reader) -> None:
    full = _save(tmp_path / ("full" + Path(name).suffix), np.tile(rgb8, (8, 8, 1)))
    assert readable_image_size(full) == read_image(full).shape[:2] == (96, 136)
    data = full.read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FundusImageError) as error:
        reader(path)
    _assert_clean_error(error, path, "cannot read")


@pytest.mark.parametrize("reader", READERS)
def test_garbage_bad_gzip_and_float_samples(tmp_path: Path, reader) -> None:
    garbage = tmp_path / "noise.png"
    garbage.write_bytes(b"this is not a picture" * 10)
    with pytest.raises(FundusImageError) as error:
        reader(garbage)
    _assert_clean_error(error, garbage, "cannot read")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(FundusImageError, match=r"empty.jpg: the file is empty \(0 bytes\)"):
        reader(empty)
    bad_gzip = tmp_path / "im.ppm.gz"
    bad_gzip.write_bytes(b"P6 not gzip at all")
    with pytest.raises(FundusImageError) as error:
        reader(bad_gzip)
    _assert_clean_error(error, bad_gzip, "cannot read")
    floats = tmp_path / "floats.tif"
    Image.fromarray(np.full((40, 40), 0.5, np.float32), mode="F").save(floats)
    with pytest.raises(FundusImageError, match="mode F"):
        reader(floats)
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.full((40, 40), 79960, np.int32), mode="I").save(wide)
    with pytest.raises(FundusImageError, match="32-bit integer samples from 79960 to 79960 have no defined range"):
        reader(wide)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.array([[0, 7], [200, 255]], np.uint8), np.array([[0, 7], [200, 255]], np.uint8)),
        (np.array([[True, False]]), np.array([[255, 0]], np.uint8)),
        (np.array([[0.0, 0.5, 1.0]], np.float32), np.array([[0, 128, 255]], np.uint8)),
    ],
)
def test_write_png_roundtrip(tmp_path: Path, array: np.ndarray, expected: np.ndarray) -> None:
    path = tmp_path / "new" / "deeper" / "m.png"
    write_png(path, array)
    np.testing.assert_array_equal(read_mask(path), expected)
    assert os.listdir(path.parent) == ["m.png"]  # the temporary file was renamed, not left behind


def test_write_png_rgb_overwrites(tmp_path: Path, rgb8: np.ndarray) -> None:
    path = tmp_path / "a.png"
    write_png(path, np.zeros((3, 3), np.uint8))
    write_png(path, rgb8)
    np.testing.assert_allclose(read_image(path), rgb8 / 255.0, atol=1e-6)


def test_write_png_rejects_bad_arrays(tmp_path: Path) -> None:
    with pytest.raises(FundusImageError, match="shape"):
        write_png(tmp_path / "a.png", np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(FundusImageError, match=r"\[0, 1\]"):
        write_png(tmp_path / "a.png", np.full((4, 4), 2.0))
    with pytest.raises(FundusImageError, match="dtype"):
        write_png(tmp_path / "a.png", np.zeros((4, 4), np.int64))
    assert not list(tmp_path.iterdir())


def test_write_png_unwritable_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    target = blocker / "sub" / "a.png"
    with pytest.raises(OutputError) as error:
        write_png(target, np.zeros((2, 2), np.uint8))
    assert str(blocker / "sub") in str(error.value)


def _disc_photo(height: int, width: int, radius: float, level: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[:height, :width]
    disc = (rows - height / 2) ** 2 + (cols - width / 2) ** 2 < radius**2
    image = np.zeros((height, width, 3), np.float32)
    image[disc] = (level, level / 2, level / 4)
    image[disc & (np.abs(cols - width / 2) < 2)] *= 0.3  # a dark "vessel" crossing the disc must not split it
    noise = np.random.default_rng(0).normal(0, 0.01, image.shape)
    return np.clip(image + noise, 0, 1).astype(np.float32), disc


def test_estimate_fov_disc_with_vessel() -> None:
    image, disc = _disc_photo(90, 120, 40)
    fov = estimate_fov(image)
    assert fov.dtype == np.bool_ and fov.shape == disc.shape
    assert (fov & disc).sum() / (fov | disc).sum() > 0.97


def test_estimate_fov_dim_photo_and_uint8() -> None:
    image, disc = _disc_photo(90, 120, 40, level=0.15)
    fov = estimate_fov((image * 255).astype(np.uint8))
    assert (fov & disc).sum() / (fov | disc).sum() > 0.97


def test_estimate_fov_without_border_is_everything() -> None:
    image = np.random.default_rng(0).uniform(0.4, 0.8, (30, 40, 3)).astype(np.float32)
    assert estimate_fov(image).all()


def _fov_by_full_median_filter(image: np.ndarray, relative_threshold: float = 0.15) -> np.ndarray:
    """The field of view as estimate_fov describes it, computed the direct way: every pixel median-filtered."""
    brightness = ndimage.median_filter(image.astype(np.float32).max(axis=-1), size=5)
    border, retina = np.percentile(brightness, [1, 90])
    regions, _ = ndimage.label(brightness > border + relative_threshold * (retina - border))
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(regions == np.argmax(sizes))


def test_the_median_filter_s_threshold_and_values_match_scipy_s_at_every_size_and_edge() -> None:
    """The box count and the sampled medians mirror the picture's edges as scipy's median_filter does: checked on
    pictures smaller than the window, where every window reaches past an edge, and on one of many windows."""
    rng = np.random.default_rng(0)
    shapes = [(rows, cols) for rows in range(1, 9) for cols in range(1, 9)] + [(37, 53)]
    for shape in shapes:
        brightness = rng.random(shape, dtype=np.float32)
        filtered = ndimage.median_filter(brightness, size=5)
        for threshold in (0.2, 0.5, 0.8):
            np.testing.assert_array_equal(_median_filtered_above(brightness, threshold), filtered > threshold)
        np.testing.assert_array_equal(_median_filtered_sample(brightness, rows_at_once=3), filtered.ravel())


@pytest.mark.parametrize("shape", [(90, 120), (1100, 1000)], ids=["every pixel", "sampled levels"])
def test_estimate_fov_is_the_median_filtered_threshold(shape: tuple[int, int]) -> None:
    # Noise strong enough that the median filter decides the border's pixels; above 2**20 pixels the levels come
    # from a sample of the filtered picture: the threshold can move a little, and the pixels at it with it.
    image, _ = _disc_photo(*shape, min(shape) // 2 - 5)
    image = np.clip(image + np.random.default_rng(1).normal(0, 0.08, image.shape), 0, 1)
    fov, reference = estimate_fov(image), _fov_by_full_median_filter(image)
    if image.shape[0] * image.shape[1] <= 2**20:
        np.testing.assert_array_equal(fov, reference)
    else:
        assert (fov != reference).mean() < 1e-4


def test_estimate_fov_matches_drive_masks(drive_dir: Path) -> None:
    ious = []
    for image_path in sorted((drive_dir / "training" / "images").glob("*.tif")):
        reference = read_mask(drive_dir / "training" / "mask" / f"{image_path.stem}_mask.gif") > 127
        fov = estimate_fov(read_image(image_path))
        ious.append((fov & reference).sum() / (fov | reference).sum())
    assert len(ious) == 20
    assert min(ious) > 0.98 and float(np.mean(ious)) > 0.99
