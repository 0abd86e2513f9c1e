"""Images as the VLMs take them: 8-bit RGB, whatever PIL mode a dataset or a folder holds.

``Image.convert("RGB")`` alone is wrong for several modes a caption dataset may hold: it *clips* 16-bit
(``I;16``, ``I;16B``, ...) and 32-bit (``I``) grayscale to 255, so a 16-bit PNG becomes a white picture, it
maps a 32-bit float (``F``) picture in 0..1 to black, and it drops an alpha channel without compositing, so
what was transparent takes whatever colour lies under it.  :func:`to_rgb` rescales instead (16-bit: ``v / 257``,
so 0 -> 0 and 65535 -> 255; a float picture is read as 0..1), composites transparency onto white (as
``transformers``' ``convert_to_rgb`` does) and refuses what it cannot read faithfully with one line naming
the image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: modes whose samples are wider than 8 bits, read as 16-bit integers (``I`` holds a 16-bit PNG in older Pillows)
WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _name(image: Any, what: str) -> str:
    path = getattr(image, "filename", None)
    return f"{what} ({path})" if path else what


def to_rgb(image: Any, what: str = "the image") -> Any:
    """``image`` (a PIL image) as an 8-bit RGB PIL image, rescaled or composited as its mode needs; anything that
    is not a PIL image (an array, a tensor) is returned as it is.  ``what`` names the image in errors (its file is
    added when PIL knows it)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        return image
    try:
        image.load()  # a lazily opened file: a truncated or corrupt one fails here, not deep in a processor
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"{_name(image, what)} cannot be decoded ({str(exc).splitlines()[0]}); fix or drop it") from None
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in WIDE_INT_MODES:
        a = np.asarray(image).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"{_name(image, what)} is a {mode} image with values in [{a.min()}, {a.max()}], outside the "
                             "16-bit range 0..65535 that jsae rescales to 0..255; rescale it to 8 or 16 bits")
        gray = np.rint(a / 257.0).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB")
    if mode == "F":
        a = np.asarray(image, dtype=np.float64)
        if a.size and (not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0):
            lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if np.isfinite(a).any() else (float("nan"),) * 2
            raise ValueError(f"{_name(image, what)} is a 32-bit float image with values in [{lo:.4g}, {hi:.4g}] (or NaN); "
                             "jsae reads float images as 0..1: rescale it to 0..1 or save it as 8-bit")
        gray = np.rint(a * 255.0).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB")
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV: PIL's conversions are exact for 8-bit modes
    except ValueError as exc:
        raise ValueError(f"{_name(image, what)} has the PIL mode {mode!r}, which cannot be converted to RGB "
                         f"({str(exc).splitlines()[0]}); save it as RGB") from None


__all__ = ["ALPHA_MODES", "WIDE_INT_MODES", "to_rgb"]
