"""The sample data's photos: one drawn vehicle per photo, its class carried by its silhouette.

Each photo (``render_photo``) has a random size (``min_width``..``max_width`` wide, aspect 0.55-0.85), a
cluttered background and one drawn vehicle inside its bounding box. The class is carried by SHAPE only: each
class has its own silhouette (roof line, cabin placement, window count, wheel count/placement, open bed, cargo
box, ...); every colour (body, windows, wheels, background) is random, the vehicle faces left or right at random
and its proportions and vertex positions are jittered. Everything derives from the generator passed in: the
same seed draws the same pixels. ``sample_data`` writes these photos in the Stanford Cars layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import cv2
import numpy as np

Point = tuple[float, float]
Box = tuple[int, int, int, int]  # (x1, y1, x2, y2) in pixels, exclusive end


# ----------------------------------------------------------------------------------------------------------
# Vehicle shapes. Coordinates are (u, v) in the unit square of the bounding box: u = 0 rear, u = 1 front,
# v = 0 top, v = 1 bottom. Each class template returns the parts to draw; the renderer maps them to pixels.
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class VehicleParts:
    body: list[list[Point]]  # filled with the body colour, outlined
    windows: list[list[Point]]  # filled with the window colour
    wheels: list[tuple[float, float]]  # (u of centre, radius as a fraction of the box HEIGHT)
    dark: list[list[Point]] = dataclasses.field(default_factory=list)  # openings (pickup bed), grilles
    lines: list[tuple[Point, Point, float]] = dataclasses.field(default_factory=list)  # (a, b, thickness in v)


def _arc(cx: float, cy: float, rx: float, ry: float, start_deg: float, end_deg: float, n: int = 12) -> list[Point]:
    angles = np.linspace(math.radians(start_deg), math.radians(end_deg), n)
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


def _rect(u1: float, v1: float, u2: float, v2: float) -> list[Point]:
    return [(u1, v1), (u2, v1), (u2, v2), (u1, v2)]


def _window_row(u1: float, u2: float, v1: float, v2: float, count: int, gap: float) -> list[list[Point]]:
    width = (u2 - u1 - gap * (count - 1)) / count
    return [_rect(u1 + i * (width + gap), v1, u1 + i * (width + gap) + width, v2) for i in range(count)]


def _lower_body(v_top: float, v_bottom: float, nose: float = 0.04, tail: float = 0.03) -> list[Point]:
    """Lower body with rounded front and rear ends."""
    return [
        (tail, v_top),
        (1 - nose * 2, v_top),
        (1.0, v_top + (v_bottom - v_top) * 0.35),
        (1.0, v_bottom - 0.04),
        (0.97, v_bottom),
        (0.03, v_bottom),
        (0.0, v_bottom - 0.05),
        (0.0, v_top + 0.05),
    ]


def _sedan(j) -> VehicleParts:
    # Three boxes: short boot, cabin in the middle with sloped front and rear screens, bonnet.
    top, base = 0.05 + j(0.03), 0.46
    cabin = [(0.20, base), (0.32, top), (0.64, top), (0.78, base)]
    return VehicleParts(
        body=[_lower_body(base - 0.01, 0.86), cabin],
        windows=[
            [(0.25, base - 0.03), (0.34, top + 0.07), (0.47, top + 0.07), (0.47, base - 0.03)],
            [(0.50, base - 0.03), (0.50, top + 0.07), (0.62, top + 0.07), (0.72, base - 0.03)],
        ],
        wheels=[(0.20, 0.17), (0.80, 0.17)],
    )


def _hatchback(j) -> VehicleParts:
    # Two boxes: roof runs to a near-vertical tailgate at the very rear, short bonnet.
    top, base = 0.06 + j(0.03), 0.47
    cabin = [(0.0, base), (0.03, top), (0.55, top), (0.74, base)]
    return VehicleParts(
        body=[_lower_body(base - 0.01, 0.86, tail=0.0), cabin],
        windows=[
            [(0.06, base - 0.04), (0.08, top + 0.07), (0.28, top + 0.07), (0.28, base - 0.04)],
            [(0.31, base - 0.04), (0.31, top + 0.07), (0.53, top + 0.07), (0.67, base - 0.04)],
        ],
        wheels=[(0.18, 0.18), (0.80, 0.18)],
    )


def _suv(j) -> VehicleParts:
    # Tall and boxy, flat roof over almost the whole length, three side windows, roof rails, big wheels.
    top, base = 0.08 + j(0.02), 0.48
    cabin = [(0.01, base), (0.02, top), (0.72, top), (0.84, base)]
    return VehicleParts(
        body=[_lower_body(base - 0.01, 0.82, nose=0.02, tail=0.0), cabin],
        windows=_window_row(0.05, 0.52, top + 0.07, base - 0.05, 2, 0.03)
        + [[(0.55, base - 0.05), (0.55, top + 0.07), (0.70, top + 0.07), (0.79, base - 0.05)]],
        wheels=[(0.19, 0.21), (0.80, 0.21)],
        lines=[
            ((0.06, top - 0.04), (0.66, top - 0.04), 0.035),
            ((0.10, top - 0.04), (0.10, top), 0.03),
            ((0.60, top - 0.04), (0.60, top), 0.03),
        ],
    )


def _pickup(j) -> VehicleParts:
    # Cab over the front half only; open load bed behind it (dark opening on the rear half).
    top, base = 0.04 + j(0.03), 0.44
    cab = [(0.42, base), (0.43, top), (0.66, top), (0.78, base)]
    bed_top = base + 0.02
    return VehicleParts(
        body=[_lower_body(base - 0.01, 0.84, tail=0.0), cab],
        windows=[[(0.50, base - 0.04), (0.50, top + 0.07), (0.64, top + 0.07), (0.73, base - 0.04)]],
        dark=[_rect(0.03, bed_top, 0.38, bed_top + 0.11)],
        wheels=[(0.17, 0.18), (0.80, 0.18)],
        lines=[((0.0, base - 0.02), (0.41, base - 0.02), 0.05)],
    )


def _van(j) -> VehicleParts:
    # One box: tall body from rear to a short sloped nose, a row of three high windows, small wheels.
    top = 0.03 + j(0.02)
    body = [(0.0, top), (0.78, top), (0.95, 0.42), (1.0, 0.50), (1.0, 0.84), (0.0, 0.84)]
    return VehicleParts(
        body=[body],
        windows=_window_row(0.05, 0.70, top + 0.08, 0.36, 3, 0.04)
        + [[(0.74, top + 0.08), (0.80, top + 0.08), (0.91, 0.38), (0.74, 0.38)]],
        wheels=[(0.15, 0.14), (0.83, 0.14)],
        lines=[((0.50, 0.42), (0.50, 0.80), 0.02)],
    )


def _coupe(j) -> VehicleParts:
    # Low wedge: long bonnet, small domed cabin set back, one window, rear spoiler on two posts.
    dome_top = 0.12 + j(0.03)
    body = [(0.0, 0.42), (0.55, 0.50), (1.0, 0.62), (1.0, 0.80), (0.96, 0.86), (0.02, 0.86), (0.0, 0.80)]
    cabin = _arc(0.40, 0.52, 0.27, 0.52 - dome_top, 180, 360, 16)
    return VehicleParts(
        body=[body, cabin],
        windows=[_arc(0.40, 0.50, 0.20, 0.50 - dome_top - 0.08, 185, 355, 14)],
        wheels=[(0.20, 0.22), (0.80, 0.22)],
        lines=[((0.0, 0.22), (0.14, 0.22), 0.05), ((0.05, 0.22), (0.05, 0.42), 0.04)],
    )


def _bus(j) -> VehicleParts:
    # Long tall rectangle with a row of many windows and a door at the front.
    top = 0.02 + j(0.02)
    return VehicleParts(
        body=[_rect(0.0, top, 1.0, 0.86)],
        windows=_window_row(0.03, 0.84, top + 0.08, 0.40, 6, 0.025) + [_rect(0.87, top + 0.08, 0.97, 0.72)],
        wheels=[(0.16, 0.13), (0.76, 0.13)],
        lines=[((0.0, 0.50), (0.85, 0.50), 0.03)],
    )


def _limousine(j) -> VehicleParts:
    # Very long and low; a long flat cabin with four windows; wheels at the far ends.
    top, base = 0.10 + j(0.03), 0.48
    cabin = [(0.10, base), (0.16, top), (0.76, top), (0.86, base)]
    return VehicleParts(
        body=[_lower_body(base - 0.01, 0.86), cabin],
        windows=_window_row(0.17, 0.74, top + 0.09, base - 0.04, 4, 0.03)
        + [[(0.76, top + 0.09), (0.76, base - 0.04), (0.83, base - 0.04)]],
        wheels=[(0.09, 0.20), (0.91, 0.20)],
    )


def _convertible(j) -> VehicleParts:
    # No roof: low body, a raked windscreen frame and two head-rests behind it.
    base = 0.42 + j(0.03)
    return VehicleParts(
        body=[
            _lower_body(base, 0.86),
            _arc(0.33, base + 0.01, 0.05, 0.12, 180, 360, 8),
            _arc(0.48, base + 0.01, 0.05, 0.12, 180, 360, 8),
        ],
        windows=[],
        dark=[_rect(0.22, base, 0.58, base + 0.06)],
        wheels=[(0.20, 0.18), (0.80, 0.18)],
        lines=[((0.62, base), (0.55, 0.10), 0.06), ((0.55, 0.10), (0.58, 0.10), 0.05)],
    )


def _box_truck(j) -> VehicleParts:
    # Tall cargo box over the rear two thirds, a lower cab in front, three wheels (tandem rear axle).
    box_top = 0.0 + j(0.02)
    cab = [(0.70, 0.30), (0.90, 0.30), (1.0, 0.52), (1.0, 0.84), (0.70, 0.84)]
    return VehicleParts(
        body=[_rect(0.0, box_top, 0.68, 0.78), cab, _rect(0.0, 0.74, 0.72, 0.80)],
        windows=[[(0.74, 0.35), (0.88, 0.35), (0.95, 0.52), (0.74, 0.52)]],
        wheels=[(0.10, 0.15), (0.30, 0.15), (0.86, 0.15)],
        lines=[((0.0, 0.38), (0.68, 0.38), 0.02)],
    )


@dataclasses.dataclass(frozen=True)
class VehicleClass:
    name: str
    aspect: float  # box height / width (before jitter)
    parts: Callable


TEMPLATES: tuple[VehicleClass, ...] = (
    VehicleClass("Sample Sedan", 0.36, _sedan),
    VehicleClass("Sample Hatchback", 0.46, _hatchback),
    VehicleClass("Sample SUV", 0.52, _suv),
    VehicleClass("Sample Pickup", 0.42, _pickup),
    VehicleClass("Sample Van", 0.55, _van),
    VehicleClass("Sample Coupe", 0.32, _coupe),
    VehicleClass("Sample Bus", 0.42, _bus),
    VehicleClass("Sample Limousine", 0.26, _limousine),
    VehicleClass("Sample Convertible", 0.33, _convertible),
    VehicleClass("Sample Box Truck", 0.55, _box_truck),
)
# Classes beyond the ten templates reuse one with a roof box on top (a second, clearly visible shape cue).
MAX_CLASSES = 2 * len(TEMPLATES)

# Background clutter: number of shapes per photo, and the share of those centred inside the box kept.
CLUTTER_MIN, CLUTTER_MAX = 25, 60
CLUTTER_IN_BOX_KEEP = 0.3
OUTLINE_WIDTH = 0.02  # of the box height


def class_names(num_classes: int) -> list[str]:
    check_num_classes(num_classes)
    names = [t.name for t in TEMPLATES]
    names += [f"{t.name} with Roof Box" for t in TEMPLATES]
    return names[:num_classes]


def check_num_classes(num_classes: int) -> None:
    if not 1 <= int(num_classes) <= MAX_CLASSES:
        raise ValueError(f"num_classes must be between 1 and {MAX_CLASSES}, got {num_classes}")


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------
def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _contrasting_colour(rng: np.random.Generator, other: Sequence[int], min_distance: float = 120.0):
    """A random colour at least ``min_distance`` away from ``other`` (so parts stay visible)."""
    for _ in range(50):
        colour = _random_colour(rng)
        if np.linalg.norm(np.subtract(colour, other, dtype=np.float64)) >= min_distance:
            return colour
    return tuple(255 - int(c) for c in other)


def _draw_background(rng: np.random.Generator, height: int, width: int, box: Box) -> np.ndarray:
    # A random two-colour gradient ...
    c1, c2 = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
    ramp = np.linspace(0.0, 1.0, height if rng.random() < 0.5 else width, dtype=np.float32)
    if len(ramp) == height:
        ramp = ramp[:, None, None]
    else:
        ramp = ramp[None, :, None]
    image = np.broadcast_to(c1 * (1 - ramp) + c2 * ramp, (height, width, 3)).astype(np.uint8).copy()
    # ... with clutter: rectangles, ellipses, lines and polygons of random colours, sizes and places.
    scale = min(height, width)
    bx1, by1, bx2, by2 = box
    for _ in range(int(rng.integers(CLUTTER_MIN, CLUTTER_MAX))):
        colour = _random_colour(rng)
        kind = rng.integers(0, 4)
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        # Less clutter right behind the vehicle: some, but not so much that the silhouette drowns at 64 px.
        if bx1 <= x < bx2 and by1 <= y < by2 and rng.random() >= CLUTTER_IN_BOX_KEEP:
            continue
        if kind == 0:
            w, h = (int(v) for v in rng.integers(scale // 30, scale // 4, size=2))
            cv2.rectangle(image, (x, y), (x + w, y + h), colour, -1 if rng.random() < 0.7 else 2)
        elif kind == 1:
            axes = tuple(int(v) for v in rng.integers(scale // 40, scale // 6, size=2))
            cv2.ellipse(
                image,
                (x, y),
                axes,
                float(rng.uniform(0, 180)),
                0,
                360,
                colour,
                -1 if rng.random() < 0.6 else 2,
                cv2.LINE_AA,
            )
        elif kind == 2:
            x2, y2 = int(rng.integers(0, width)), int(rng.integers(0, height))
            cv2.line(image, (x, y), (x2, y2), colour, int(rng.integers(1, max(2, scale // 60))), cv2.LINE_AA)
        else:
            n = int(rng.integers(3, 6))
            pts = np.stack(
                [
                    rng.integers(x - scale // 6, x + scale // 6, size=n),
                    rng.integers(y - scale // 6, y + scale // 6, size=n),
                ],
                axis=1,
            ).astype(np.int32)
            cv2.fillPoly(image, [pts], colour, cv2.LINE_AA)
    return image


# cv2 draws at fixed-point coordinates: SHIFT fractional bits keep anti-aliased edges smooth at small sizes.
SHIFT = 4
_ONE = 1 << SHIFT


def _fixed(value: float) -> int:
    """A pixel coordinate or length in cv2's fixed-point units."""
    return int(round(value * _ONE))


def _box_x(u: float, box: Box, flip: bool) -> float:
    """Pixel x of ``u`` across the box (0 rear, 1 front), mirrored when the vehicle faces the other way."""
    x1, _, x2, _ = box
    return x1 + (1.0 - u if flip else u) * (x2 - x1)


def _to_pixels(points: Sequence[Point], box: Box, flip: bool) -> np.ndarray:
    """Fixed-point pixels of unit-box points (u, v); the one mapping for polygons, lines and wheels."""
    y1, h = box[1], box[3] - box[1]
    return np.round(np.array([(_box_x(u, box, flip), y1 + v * h) for u, v in points]) * _ONE).astype(np.int32)


def _shade(colour: Sequence[int], factor: float) -> tuple[int, int, int]:
    return tuple(int(c) for c in (np.array(colour) * factor).astype(int))


def _jittered(points: Sequence[Point], rng: np.random.Generator, amount: float) -> list[Point]:
    return [(u + rng.uniform(-amount, amount), v + rng.uniform(-amount, amount)) for u, v in points]


def draw_vehicle(image: np.ndarray, class_id: int, box: Box, rng: np.random.Generator) -> None:
    """Draw the vehicle of ``class_id`` (0-based) filling ``box`` = (x1, y1, x2, y2), exclusive end."""
    template = TEMPLATES[class_id % len(TEMPLATES)]
    roof_box = class_id >= len(TEMPLATES)

    def jitter(amount):
        return float(rng.uniform(-amount, amount))

    parts = template.parts(jitter)
    flip = bool(rng.random() < 0.5)
    body_colour = _random_colour(rng)
    window_colour = _contrasting_colour(rng, body_colour)
    outline = _shade(body_colour, 0.35)
    h = box[3] - box[1]
    thickness = max(1, int(round(h * OUTLINE_WIDTH)))

    def poly(points, colour, fill=True, jitter_amount=0.008):
        pts = _to_pixels(_jittered(points, rng, jitter_amount), box, flip)
        if fill:
            cv2.fillPoly(image, [pts], colour, cv2.LINE_AA, SHIFT)
        cv2.polylines(image, [pts], True, outline, thickness, cv2.LINE_AA, SHIFT)

    if roof_box:
        # Roof box: a long low case on top of the roof line.
        poly(_rect(0.22, 0.0, 0.62, 0.06), _contrasting_colour(rng, body_colour, 80), jitter_amount=0.0)
    for points in parts.body:
        poly(points, body_colour)
    for points in parts.dark:
        poly(points, _shade(body_colour, 0.25), jitter_amount=0.003)
    for points in parts.windows:
        poly(points, window_colour, jitter_amount=0.004)
    for a, b, width in parts.lines:
        start, end = (tuple(int(c) for c in p) for p in _to_pixels([a, b], box, flip))
        cv2.line(image, start, end, outline, max(1, int(round(width * h))), cv2.LINE_AA, SHIFT)
    tyre = tuple(int(c) for c in rng.integers(0, 60, size=3))
    hub = _contrasting_colour(rng, tyre, 100)
    for u, radius in parts.wheels:
        r = radius * h * (1 + jitter(0.06))
        centre = (_fixed(_box_x(u, box, flip)), _fixed(box[3] - r))  # standing on the box's bottom edge
        for disc, colour in ((r, tyre), (r * 0.5, hub)):
            cv2.circle(image, centre, _fixed(disc), colour, -1, cv2.LINE_AA, SHIFT)


def render_photo(class_id: int, rng: np.random.Generator, min_width: int, max_width: int):
    """One RGB photo with a vehicle of ``class_id``; returns (image, bbox (x1, y1, x2, y2) exclusive end)."""
    width = int(rng.integers(min_width, max_width + 1))
    height = max(16, int(round(width * rng.uniform(0.55, 0.85))))
    template = TEMPLATES[class_id % len(TEMPLATES)]
    aspect = template.aspect * rng.uniform(0.88, 1.12)
    box_w = width * rng.uniform(0.45, 0.85)
    box_h = box_w * aspect
    if box_h > height * 0.9:  # keep the box inside the photo
        box_h = height * 0.9
        box_w = box_h / aspect
    box_w, box_h = max(8, int(round(box_w))), max(8, int(round(box_h)))
    x1 = int(rng.integers(0, width - box_w + 1))
    y1 = int(rng.integers(0, height - box_h + 1))
    box = (x1, y1, x1 + box_w, y1 + box_h)
    image = _draw_background(rng, height, width, box)
    draw_vehicle(image, class_id, box, rng)
    # Sensor noise, so that flat colours are not a give-away and JPEG has texture to work on.
    noise = rng.integers(-8, 9, size=image.shape, dtype=np.int16)
    image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return image, box
