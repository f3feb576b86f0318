"""Turning an image file into the RGB picture the image processor expects."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# A decompression bomb is refused rather than decoded: 8K x 8K is far beyond any photo we need.
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image that cannot be used, with a message fit for one line on a terminal."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB with its EXIF orientation applied."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"image {path} is a folder, not an image file")
    if not path.is_file():
        raise ImageError(f"image {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if opened.width * opened.height > MAX_PIXELS:
                    raise ImageError(f"image {path} is {opened.width}x{opened.height}: over the "
                                     f"{MAX_PIXELS:,}-pixel limit (possible decompression bomb)")
                opened.load()
                image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"image {path} cannot be read: {error}") from None
    except OSError as error:
        raise ImageError(f"image {path} cannot be read (truncated or corrupt): {error}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit grey is rescaled, transparency is laid on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit PNGs hold 0..65535; a plain convert("L") would clip almost everything to white.
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: the image centred on a square of colour ``fill``, nothing cut away."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square
