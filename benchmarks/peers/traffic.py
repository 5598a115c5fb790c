"""The one traffic generator every system gets: real photos in a fixed size mix, Poisson arrivals.

Images are crops of scikit-image's bundled photos resized so the longest side falls in the size
class's range (aspect 0.6–1.0, either orientation), encoded as PNG once. A request draws its class
with the mix's probabilities and then one image of that class, all from one seeded generator, so two
runs (and every system in a run) see exactly the same requests at exactly the same times.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: (name, probability, longest side min, max) of each size class.
SIZE_CLASSES: tuple[tuple[str, float, int, int], ...] = (
    ("tiny", 0.3, 64, 128),
    ("medium", 0.5, 200, 400),
    ("large", 0.2, 600, 1000),
)
CLASS_NAMES: tuple[str, ...] = tuple(c[0] for c in SIZE_CLASSES)
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
)
ASPECT = (0.6, 1.0)


@dataclass(frozen=True)
class PoolImage:
    """One pre-encoded request body."""

    size_class: str
    width: int
    height: int
    png: bytes
    photo: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class Arrival:
    t: float  # seconds after the cell's start
    image: int  # index into the pool


def _photo(name: str) -> np.ndarray:
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())[..., :3]


def image_size(rng: random.Random, lo: int, hi: int) -> tuple[int, int]:
    """(width, height): longest side uniform in [lo, hi], aspect uniform in ASPECT, random orientation."""
    longest = rng.randint(lo, hi)
    short = max(1, round(longest * rng.uniform(*ASPECT)))
    return (longest, short) if rng.random() < 0.5 else (short, longest)


def make_image(
    photo: np.ndarray, name: str, size_class: str, w: int, h: int, rng: random.Random
) -> PoolImage:
    """A random crop of `photo` at the target aspect, resized to w×h (Lanczos), as PNG."""
    ph, pw = photo.shape[:2]
    scale = rng.uniform(0.5, 1.0)  # crop a part of the photo, as large as the aspect allows times this
    cw = max(8, min(pw, round(min(pw, ph * w / h) * scale)))
    ch = max(8, min(ph, round(cw * h / w)))
    x0, y0 = rng.randint(0, pw - cw), rng.randint(0, ph - ch)
    crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw])
    buf = io.BytesIO()
    crop.resize((w, h), Image.Resampling.LANCZOS).save(buf, format="PNG", compress_level=6)
    return PoolImage(size_class, w, h, buf.getvalue(), name)


def make_pool(per_class: int = 12, seed: int = 0) -> list[PoolImage]:
    """`per_class` distinct images of every size class (deterministic for a seed)."""
    rng = random.Random(seed)
    photos = {n: _photo(n) for n in PHOTOS}
    pool: list[PoolImage] = []
    for name, _, lo, hi in SIZE_CLASSES:
        for i in range(per_class):
            w, h = image_size(rng, lo, hi)
            photo = PHOTOS[(i + len(pool)) % len(PHOTOS)]
            pool.append(make_image(photos[photo], photo, name, w, h, rng))
    return pool


def arrivals(pool: list[PoolImage], rate: float, duration: float, seed: int = 1) -> list[Arrival]:
    """Poisson arrivals at `rate` per second for `duration` s; each draws a class, then an image of it."""
    if rate <= 0 or duration <= 0:
        return []
    rng = random.Random(seed)
    by_class = {c: [i for i, im in enumerate(pool) if im.size_class == c] for c in CLASS_NAMES}
    weights = [p for _, p, _, _ in SIZE_CLASSES]
    out: list[Arrival] = []
    t = rng.expovariate(rate)
    while t < duration:
        cls = rng.choices(CLASS_NAMES, weights)[0]
        out.append(Arrival(t, rng.choice(by_class[cls])))
        t += rng.expovariate(rate)
    return out


def mean_output_mp(pool: list[PoolImage], scale: int = 4) -> float:
    """Expected output megapixels of one request under the mix (to turn req/s into MP/s)."""
    total = 0.0
    for name, p, _, _ in SIZE_CLASSES:
        members = [im for im in pool if im.size_class == name]
        total += p * sum(im.pixels for im in members) / len(members) * scale * scale / 1e6
    return total
