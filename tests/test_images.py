"""Image loading: orientation, modes, bombs, padding to a square."""

import numpy as np
import pytest
from PIL import Image

from vlm.images import MAX_PIXELS, ImageError, expand_to_square, load_image


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    suffix = ".jpg" if mode == "CMYK" else (".tiff" if mode == "I;16" else ".png")
    Image.new("RGB", (8, 8), (100, 150, 200)).convert(mode).save(tmp_path / f"x{suffix}")
    loaded = load_image(tmp_path / f"x{suffix}")
    assert loaded.mode == "RGB" and loaded.size == (8, 8)


def test_sixteen_bit_grey_is_rescaled_not_clipped(tmp_path):
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert load_image(tmp_path / "g16.png").getpixel((0, 0)) == (128, 128, 128)


def test_transparent_pixels_lie_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((1, 1)) == (255, 255, 255)


def test_decompression_bomb_is_refused(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 100
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(tmp_path / "bomb.png")


def test_missing_truncated_and_non_images_fail_with_one_line(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "none.png")
    with pytest.raises(ImageError, match="is a folder, not an image file"):
        load_image(tmp_path)
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(ImageError, match="cannot be read"):
        load_image(tmp_path / "text.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    with pytest.raises(ImageError, match="cannot be read"):
        load_image(tmp_path / "cut.jpg")


@pytest.mark.parametrize(("size", "offset"), [((60, 30), (0, 15)), ((30, 61), (15, 0))])
def test_expand_to_square_centres_the_image_as_llava_does(size, offset):
    image = Image.new("RGB", size, (255, 0, 0))
    padded = expand_to_square(image, (1, 2, 3))
    side = max(size)
    assert padded.size == (side, side) and padded.getpixel((0, 0)) == (1, 2, 3)
    # LLaVA's expand2square pastes at ((side - width) // 2, (side - height) // 2).
    assert padded.getpixel(offset) == (255, 0, 0)
    assert padded.getpixel((offset[0] + size[0] - 1, offset[1] + size[1] - 1)) == (255, 0, 0)
    assert padded.getpixel((side - 1, side - 1)) == (1, 2, 3)
    assert expand_to_square(padded, (0, 0, 0)) is padded
