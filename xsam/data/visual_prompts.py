"""Visual prompt rasterisers: point, scribble, box and mask prompts derived from an object mask.

Every function takes an object mask `mask` of shape (H, W) (bool or 0/1) and a numpy Generator,
and returns an (H, W) bool prompt mask at the same resolution. All randomness comes from the
generator, drawn in a fixed order, so a given generator state always gives the same prompt.

Rules (reference section 1, "Visual prompts"):

- point: one random pixel inside each connected component of area > MIN_AREA, dilated to a disc
  of radius POINT_RADIUS;
- scribble: per component, a diagonal line across a jittered copy of its box (each side scaled by
  U(0.5, 1.2) around the component's centroid, redrawn until IoU >= 0.5 with the component box),
  plus a sine wobble along the rows (amplitude U(10, 20) px, frequency U(0.2, 1) periods over the
  line, random phase), dilated to radius SCRIBBLE_RADIUS;
- box: per component, the filled bounding box scaled by U(0.9, 1.1) about its centre;
- mask: Gaussian blur (sigma 2) of the whole mask, thresholded at the mean of the blurred image.

Components use 8-connectivity. Where the rules would give an empty prompt for a non-empty mask
(every component has area <= MIN_AREA; no jittered box reached IoU 0.5; a mask covering the
whole image blurs to a constant), a fallback keeps the prompt non-empty: the largest component
is used, the component box itself, the mask itself. An empty `mask` gives empty prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MIN_AREA = 5  # components of at most this many pixels get no point / scribble / box
POINT_RADIUS = 10
SCRIBBLE_RADIUS = 5
BOX_SCALE = (0.9, 1.1)
SCRIBBLE_BOX_SCALE = (0.5, 1.2)
SCRIBBLE_MIN_IOU = 0.5
SCRIBBLE_AMPLITUDE = (10.0, 20.0)
SCRIBBLE_FREQUENCY = (0.2, 1.0)
MASK_SIGMA = 2.0
MAX_RETRIES = 100

_EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Component:
    """One connected component: its pixels as (N, 2) int (row, col), its box [r0, r1) x [c0, c1)."""

    pixels: np.ndarray
    box: tuple[int, int, int, int]  # r0, c0, r1, c1 (end exclusive)

    @property
    def area(self) -> int:
        return len(self.pixels)

    @property
    def centroid(self) -> tuple[float, float]:
        r, c = self.pixels.mean(axis=0)
        return float(r), float(c)


def components(mask: np.ndarray) -> list[Component]:
    """The prompt-worthy components of an (H, W) mask, in label order.

    Components of area > MIN_AREA; if there are none, the largest component alone (ties: the
    first in label order); [] for an empty mask."""
    mask = np.asarray(mask, bool)
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(rows) == 0:
        return []
    r0, c0 = int(rows[0]), int(cols[0])
    crop = mask[r0:rows[-1] + 1, c0:cols[-1] + 1]  # label inside the mask's box only: cheaper
    labels, _count = ndimage.label(crop, structure=_EIGHT_CONNECTED)
    found = []
    for index, (sr, sc) in enumerate(ndimage.find_objects(labels), start=1):
        pix = np.argwhere(labels[sr, sc] == index) + (sr.start + r0, sc.start + c0)
        found.append(Component(pix, (sr.start + r0, sc.start + c0, sr.stop + r0, sc.stop + c0)))
    big = [c for c in found if c.area > MIN_AREA]
    if big:
        return big
    return [max(found, key=lambda c: c.area)]


def disc(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) bool structuring element: pixels within Euclidean distance `radius` of the centre."""
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def dilate(seeds: np.ndarray, radius: int) -> np.ndarray:
    """(H, W) bool seeds -> (H, W) bool: every pixel within distance `radius` of a seed.

    Works inside the seeds' box grown by `radius`, so a few seed pixels in a large image are cheap."""
    out = np.zeros(seeds.shape, bool)
    rows, cols = np.nonzero(seeds.any(axis=1))[0], np.nonzero(seeds.any(axis=0))[0]
    if len(rows) == 0:
        return out
    h, w = seeds.shape
    r0, r1 = max(0, rows[0] - radius), min(h, rows[-1] + radius + 1)
    c0, c1 = max(0, cols[0] - radius), min(w, cols[-1] + radius + 1)
    # pad so that the structuring element never meets the window border
    window = np.pad(seeds[r0:r1, c0:c1], radius)
    grown = ndimage.binary_dilation(window, structure=disc(radius))
    out[r0:r1, c0:c1] = grown[radius:radius + (r1 - r0), radius:radius + (c1 - c0)]
    return out


def point_prompt(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) mask -> (H, W) bool: a disc of radius POINT_RADIUS around one uniformly drawn pixel
    of each component."""
    seeds = np.zeros(np.shape(mask), bool)
    for comp in components(mask):
        r, c = comp.pixels[int(rng.integers(comp.area))]
        seeds[r, c] = True
    return dilate(seeds, POINT_RADIUS)


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two (r0, c0, r1, c1) boxes with exclusive ends."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def _jittered_box(comp: Component, shape: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The component box rescaled per side by U(0.5, 1.2) about the centroid, clipped to the image,
    redrawn until its IoU with the component box is >= 0.5 (else the component box itself)."""
    r0, c0, r1, c1 = comp.box
    cr, cc = comp.centroid
    for _ in range(MAX_RETRIES):
        sh, sw = rng.uniform(*SCRIBBLE_BOX_SCALE, size=2)
        hh, hw = (r1 - r0) * sh / 2, (c1 - c0) * sw / 2
        box = (max(0, round(cr - hh)), max(0, round(cc - hw)),
               min(shape[0], round(cr + hh)), min(shape[1], round(cc + hw)))
        if box_iou(box, comp.box) >= SCRIBBLE_MIN_IOU:
            return box
    return comp.box


def scribble_prompt(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) mask -> (H, W) bool: per component a wobbly diagonal stroke of radius SCRIBBLE_RADIUS
    across a jittered copy of its box."""
    shape = np.shape(mask)
    seeds = np.zeros(shape, bool)
    for comp in components(mask):
        r0, c0, r1, c1 = _jittered_box(comp, shape, rng)
        corners = [(r0, c0), (r0, c1 - 1), (r1 - 1, c0), (r1 - 1, c1 - 1)]
        start = int(rng.integers(4))
        (sr, sc), (er, ec) = corners[start], corners[3 - start]  # 3 - k is the opposite corner
        n = max(abs(er - sr), abs(ec - sc)) + 1
        t = np.linspace(0.0, 1.0, n)
        amplitude, frequency = rng.uniform(*SCRIBBLE_AMPLITUDE), rng.uniform(*SCRIBBLE_FREQUENCY)
        phase = rng.uniform(0.0, 2 * np.pi)
        rows = sr + (er - sr) * t + amplitude * np.sin(2 * np.pi * frequency * t + phase)
        cols = sc + (ec - sc) * t
        rows = np.clip(np.round(rows), 0, shape[0] - 1).astype(np.int64)
        cols = np.clip(np.round(cols), 0, shape[1] - 1).astype(np.int64)
        seeds[rows, cols] = True
    return dilate(seeds, SCRIBBLE_RADIUS)


def box_prompt(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) mask -> (H, W) bool: per component its filled bounding box, scaled by one
    U(0.9, 1.1) factor about the box centre, clipped to the image (at least 1 px a side)."""
    shape = np.shape(mask)
    out = np.zeros(shape, bool)
    for comp in components(mask):
        r0, c0, r1, c1 = comp.box
        scale = rng.uniform(*BOX_SCALE)
        dr, dc = (r1 - r0) * (scale - 1) / 2, (c1 - c0) * (scale - 1) / 2
        nr0, nc0 = max(0, round(r0 - dr)), max(0, round(c0 - dc))
        nr1, nc1 = min(shape[0], round(r1 + dr)), min(shape[1], round(c1 + dc))
        out[nr0:max(nr1, nr0 + 1), nc0:max(nc1, nc0 + 1)] = True
    return out


def mask_prompt(mask: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """(H, W) mask -> (H, W) bool: Gaussian blur (sigma 2), kept where above the blurred image's
    mean; a slightly grown, smoothed copy of the mask. Draws nothing from `rng`."""
    mask = np.asarray(mask, bool)
    if not mask.any() or mask.all():  # constant masks blur to a constant: nothing to threshold
        return mask.copy()
    blurred = ndimage.gaussian_filter(mask.astype(np.float64), sigma=MASK_SIGMA)
    out = blurred > blurred.mean()
    return out if out.any() else mask.copy()


PROMPTS = {"point": point_prompt, "scribble": scribble_prompt, "box": box_prompt, "mask": mask_prompt}


def all_prompts(mask: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The four prompts of one (H, W) mask, drawn from `rng` in the order point, scribble, box, mask."""
    return {name: fn(mask, rng) for name, fn in PROMPTS.items()}
