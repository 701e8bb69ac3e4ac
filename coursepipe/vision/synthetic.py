"""Generated images with a known rule (the offline samples of the image recipes): a filled shape in
a colour on a noisy background, so a class can depend on the shape, the colour or both."""
from __future__ import annotations

import io

import numpy as np


SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40)}


def shape_image(shape: str, colour: tuple[int, int, int], rng: np.random.Generator, side: int = 64):
    """A jittered filled shape in `colour` (tinted per image) on a noisy random background."""
    from PIL import Image, ImageDraw

    bg = rng.integers(0, 256, 3)
    noise = rng.normal(0, 18, (side, side, 3))
    arr = np.clip(bg[None, None] * 0.6 + 50 + noise, 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(im)
    r = side * rng.uniform(0.22, 0.38)
    cx, cy = side / 2 + rng.uniform(-side / 8, side / 8, 2)
    fill = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in colour)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return im.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR)


def encode(im, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()
