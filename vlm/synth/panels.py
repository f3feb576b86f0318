"""Procedural equipment-inspection panels whose ground truth is known exactly.

The truth is sampled first (``sample_truth``) and the image is drawn from it (``render``), each from its own
random stream, so changing how a panel looks never changes what it shows. The vocabulary and the rules
that grade a panel are the inspection domain's (``vlm.inspection``).
"""

import functools
import math
import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from vlm.inspection import (  # noqa: F401  (the renderer's callers read the domain from here too)
    ACTIONS,
    CODE_LETTERS,
    DAMAGE_SEVERITY,
    DAMAGE_TYPES,
    LAMP_COLOURS,
    LAMP_LABELS,
    LOCATIONS,
    REPORT_FIELDS,
    SEVERITIES,
    assess,
    findings,
    make_report,
)

LAMP_ON_P = {"PWR": 0.85, "RUN": 0.6, "FAULT": 0.18, "TEMP": 0.25, "COMM": 0.6, "ALARM": 0.15}
# Cheap defects drawn more often than severe ones, so the overall severities come out roughly balanced.
DAMAGE_WEIGHTS = {"crack": 0.18, "corrosion": 0.22, "scorch": 0.12, "missing_screw": 0.26, "dent": 0.22}
RGB = {"green": (40, 225, 70), "amber": (255, 170, 20), "red": (245, 40, 30), "blue": (40, 130, 255)}
# Screws sit on the eight border cells, so a missing screw can be anywhere but the center.
SCREWS = {"top-left": (0.045, 0.045), "top-center": (0.5, 0.035), "top-right": (0.955, 0.045),
          "middle-left": (0.035, 0.5), "middle-right": (0.965, 0.5), "bottom-left": (0.045, 0.955),
          "bottom-center": (0.5, 0.965), "bottom-right": (0.955, 0.955)}
# Where each row of cells has its damage drawn, as a share of the panel's height. The top row's is below
# the code, at the tag plate's lower edge: at the row's centre it lay under the print, and the patch that
# read a code character also had to tell what was under it.
CELL_ROWS = (0.29, 0.5, 5 / 6)
FACES = ((200, 202, 205), (176, 186, 196), (206, 198, 178), (150, 165, 150), (125, 135, 145))
RUST = ((150, 75, 30), (120, 60, 25), (180, 100, 40), (95, 50, 30))


def sample_truth(rng: random.Random) -> dict:
    """What a panel shows: asset code, lamps (left to right), gauge, damage, warning label."""
    code = "".join(rng.choice(CODE_LETTERS) for _ in range(2)) + f"-{rng.randrange(10000):04d}"
    labels = rng.sample(LAMP_LABELS, rng.randint(2, 4))
    # Rule 1 would fire on ~2% of panels by chance; staging it on 7% gives "critical" enough examples.
    critical = rng.random() < 0.07
    if critical and "FAULT" not in labels:
        labels[rng.randrange(len(labels))] = "FAULT"
    lamps = [{"label": label, "colour": LAMP_COLOURS[label],
              "on": (critical and label == "FAULT") or rng.random() < LAMP_ON_P[label]} for label in labels]
    gauge = rng.randint(0, 100)
    count = max(rng.choices((0, 1, 2), weights=(0.43, 0.39, 0.18))[0], int(critical))
    damage: list[dict] = []
    for i in range(count):
        weights = list(DAMAGE_WEIGHTS.values())
        kind = "scorch" if critical and i == 0 else rng.choices(DAMAGE_TYPES, weights)[0]
        taken = {item["location"] for item in damage}
        free = [loc for loc in LOCATIONS if loc not in taken and (kind != "missing_screw" or loc in SCREWS)]
        damage.append({"type": kind, "location": rng.choice(free), "severity": DAMAGE_SEVERITY[kind]})
    damage.sort(key=lambda item: LOCATIONS.index(item["location"]))
    return {"asset_code": code, "lamps": lamps, "gauge_reading": gauge, "damage": damage,
            "warning_label": rng.random() < 0.5}


def panel_id(seed: int, index: int) -> str:
    return f"panel_{seed}_{index:05d}"


def generate_panel(seed: int, index: int, size: int = 336) -> tuple[Image.Image, dict]:
    """Panel ``index`` of dataset ``seed`` as a ``size`` x ``size`` RGB image, and its ground truth.

    The panel depends on (seed, index) only, so panel i is the same in a dataset of 5 or of 50.
    """
    truth = sample_truth(random.Random(f"vlm.synth.truth:{seed}:{index}"))
    rng = random.Random(f"vlm.synth.render:{seed}:{index}")
    image, camera = render(truth, size, rng, np.random.default_rng(rng.getrandbits(64)))
    return image, {"id": panel_id(seed, index), **truth, "camera": camera}


@functools.lru_cache(maxsize=256)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(px, 5))


def _fit_font(text: str, max_w: float, max_h: float) -> ImageFont.FreeTypeFont:
    # The built-in font scales linearly, so one measurement at a reference size sizes any box.
    left, top, right, bottom = _font(100).getbbox(text)
    return _font(int(min(100 * max_w / (right - left), 100 * max_h / (bottom - top))))


def _box(x: float, y: float, r: float, ry: float | None = None) -> tuple[float, float, float, float]:
    return (x - r, y - (r if ry is None else ry), x + r, y + (r if ry is None else ry))


def _mix(a: tuple, b: tuple, t: float) -> tuple[int, ...]:
    return tuple(round(x * (1 - t) + y * t) for x, y in zip(a, b, strict=True))


def _polar(cx: float, cy: float, r: float, degrees: float) -> tuple[float, float]:
    return cx + r * math.cos(math.radians(degrees)), cy + r * math.sin(math.radians(degrees))


def _gauge_angle(value: float) -> float:
    # PIL angles run clockwise from 3 o'clock: 0 sits at bottom-left, 100 at bottom-right (270 deg sweep).
    return 135 + 2.7 * value


def _gauge(d: ImageDraw.ImageDraw, value: int, cx: float, cy: float, r: float) -> Callable[[], None]:
    d.ellipse(_box(cx, cy, r), fill=(40, 40, 45))
    d.ellipse(_box(cx, cy, r * 0.9), fill=(246, 246, 240))
    width = max(1, round(r * 0.09))
    d.arc(_box(cx, cy, r * 0.8), _gauge_angle(75), _gauge_angle(90), fill=(245, 170, 30), width=width)
    d.arc(_box(cx, cy, r * 0.8), _gauge_angle(90), _gauge_angle(100), fill=(220, 40, 30), width=width)
    font = _font(round(r * 0.2))
    for v in range(0, 101, 5):
        major, a = v % 10 == 0, _gauge_angle(v)
        d.line((*_polar(cx, cy, r * (0.66 if major else 0.73), a), *_polar(cx, cy, 0.83 * r, a)),
               fill=(25, 25, 25), width=max(1, round(r * (0.045 if major else 0.02))))
        if v % 20 == 0 and font.size >= 7:  # smaller numerals are noise, not information
            d.text(_polar(cx, cy, 0.5 * r, a), str(v), font=font, fill=(60, 60, 60), anchor="mm")
    a = _gauge_angle(value)
    shape = [_polar(cx, cy, 0.82 * r, a), *(_polar(cx, cy, 0.15 * r, a + turn) for turn in (160, -160))]

    def needle() -> None:
        d.polygon(shape, fill=(200, 25, 20))
        d.ellipse(_box(cx, cy, r * 0.09), fill=(30, 30, 30))
    return needle


def _tag(d: ImageDraw.ImageDraw, code: str, pw: int, ph: int,
         rng: random.Random) -> tuple[Callable[[], None], list[tuple[float, float]]]:
    x0, y0, x1, y1 = 0.08 * pw, 0.065 * ph, 0.92 * pw, 0.3 * ph
    plate, ink = rng.choice((((238, 238, 232), (20, 20, 25)), ((242, 226, 150), (25, 20, 15)),
                             ((212, 216, 222), (15, 25, 60)), ((40, 42, 48), (240, 240, 235))))
    d.rounded_rectangle((x0, y0, x1, y1), radius=(y1 - y0) * 0.12, fill=plate, outline=(60, 60, 60),
                        width=max(1, round(pw / 150)))
    # Letter-spaced across a plate as wide as the panel allows, as stamped tags are: set tight on a narrower
    # plate, neighbouring characters sat 7.9 px apart at 128 px and often shared an 8-px patch; here 12.0.
    # The glyphs grow with the plate too: spaced out but shrunk to the old plate, they read worse.
    font = _fit_font(code, 0.62 * (x1 - x0), 0.66 * (y1 - y0))
    # Sized by the plate's width the print fills only 0.4 of its height: stretched upright, as condensed
    # stamping fonts are, each glyph gets more pixel rows where B, P and R differ.
    top, bottom = font.getbbox(code)[1::2]
    stretch = min(1.6, 0.62 * (y1 - y0) / (bottom - top))
    advances = [font.getlength(c) for c in code]
    gap = (0.92 * (x1 - x0) - sum(advances)) / (len(code) - 1)
    cy, left = (y0 + y1) / 2, (x0 + x1) / 2 - 0.46 * (x1 - x0)
    centres = [(left + sum(advances[:i]) + i * gap + advances[i] / 2, cy) for i in range(len(code))]
    rim = max(1, font.size // 14)

    def glyph(c: str, stroke: int) -> Image.Image:
        mask = Image.new("L", (round(font.getlength(c)) + 2 * stroke + 2, font.size + 2 * stroke + 2))
        ImageDraw.Draw(mask).text((mask.width / 2, mask.height / 2), c, font=font, fill=255, anchor="mm",
                                  stroke_width=stroke)
        return mask.resize((mask.width, round(mask.height * stretch)), Image.Resampling.BICUBIC)

    def draw() -> None:
        # A rim of plate colour keeps the print readable where dark rust or soot lies under it.
        for c, (x, y) in zip(code, centres, strict=True):
            for mask, colour in ((glyph(c, rim), plate), (glyph(c, 0), ink)):
                d.bitmap((round(x - mask.width / 2), round(y - mask.height / 2)), mask, fill=colour)
    return draw, centres


def _warning(d: ImageDraw.ImageDraw, cx: float, cy: float, side: float) -> None:
    h = side * 0.87
    outer = [(cx, cy - 0.6 * h), (cx - side / 2, cy + 0.4 * h), (cx + side / 2, cy + 0.4 * h)]
    gx, gy = cx, cy + h / 15  # the centroid, so the yellow inset keeps an even black rim
    d.polygon(outer, fill=(20, 20, 20))
    d.polygon([(gx + 0.78 * (x - gx), gy + 0.78 * (y - gy)) for x, y in outer], fill=(250, 205, 30))
    w = side * 0.045
    d.rectangle((cx - w, cy - 0.22 * h, cx + w, cy + 0.12 * h), fill=(20, 20, 20))
    d.ellipse(_box(cx, cy + 0.24 * h, w * 1.1), fill=(20, 20, 20))


def _sticker(d: ImageDraw.ImageDraw, cx: float, cy: float, w: float, rng: random.Random) -> None:
    # A harmless info sticker where warnings go, so "something is stuck here" does not mean "warning".
    h = w * 0.7
    d.rectangle(_box(cx, cy, w / 2, h / 2), fill=(236, 240, 245), outline=(40, 80, 160))
    d.rectangle((cx - w / 2, cy - h / 2, cx + w / 2, cy - h / 4), fill=(40, 80, 160))
    for i in range(3):
        y = cy - h / 10 + i * h / 6
        d.line((cx - w * 0.4, y, cx + w * rng.uniform(0.0, 0.4), y), fill=(120, 120, 130),
               width=max(1, round(h / 14)))


def _lamps(panel: Image.Image, d: ImageDraw.ImageDraw, lamps: list[dict], pw: int, ph: int,
           face: tuple[int, ...]) -> None:
    cell = 0.76 * pw / len(lamps)
    r = min(0.045 * min(pw, ph), 0.3 * cell)
    y = 0.785 * ph
    font = _fit_font("ALARM", 0.9 * cell, 0.055 * ph)  # one size for all: sized by the widest label
    top = int(y - 3 * r)
    glow = Image.new("RGBA", (pw, int(6 * r)), (0, 0, 0, 0))
    gd = ImageDraw.Draw(glow)
    for i, lamp in enumerate(lamps):
        x, rgb = 0.12 * pw + cell * (i + 0.5), RGB[lamp["colour"]]
        d.ellipse(_box(x, y, r * 1.35), fill=(45, 45, 50))
        if lamp["on"]:
            gd.ellipse(_box(x, y - top, r * 2.3), fill=(*rgb, 190))
            d.ellipse(_box(x, y, r), fill=rgb)
            d.ellipse(_box(x - 0.2 * r, y - 0.2 * r, 0.45 * r), fill=_mix(rgb, (255, 255, 255), 0.75))
        else:
            d.ellipse(_box(x, y, r), fill=_mix(rgb, (50, 50, 50), 0.8))
            d.ellipse(_box(x - 0.35 * r, y - 0.35 * r, 0.22 * r), fill=(105, 105, 105))
        d.text((x, y + 1.6 * r), lamp["label"], font=font, fill=(20, 20, 20), anchor="mt", stroke_width=1,
               stroke_fill=face)
    glow = glow.filter(ImageFilter.GaussianBlur(r * 0.7))
    panel.paste(glow, (0, top), glow)


def _damage(d: ImageDraw.ImageDraw, item: dict, pw: int, ph: int, rng: random.Random) -> None:
    if item["type"] == "missing_screw":
        return  # drawn as an empty hole by the screw pass
    col, row = LOCATIONS.index(item["location"]) % 3, LOCATIONS.index(item["location"]) // 3
    s = min(pw, ph) / 3
    cx, cy = (col + 0.5 + rng.uniform(-0.1, 0.1)) * pw / 3, (CELL_ROWS[row] + rng.uniform(-0.033, 0.033)) * ph
    kind, line = item["type"], max(2, round(min(pw, ph) / 110))
    if kind == "crack":
        a, length = rng.uniform(0, math.pi), s * rng.uniform(0.6, 0.8)
        pts = [(cx + (t / 7 - 0.5) * length * math.cos(a) + rng.uniform(-0.07, 0.07) * s,
                cy + (t / 7 - 0.5) * length * math.sin(a) + rng.uniform(-0.07, 0.07) * s) for t in range(8)]
        d.line(pts, fill=(25, 20, 18, 255), width=line, joint="curve")
        b = a + rng.choice((-1, 1)) * rng.uniform(0.5, 0.9)
        x, y = pts[rng.randint(2, 5)]
        d.line([(x + t * 0.1 * s * math.cos(b), y + t * 0.1 * s * math.sin(b) + rng.uniform(-0.03, 0.03) * s)
                for t in range(4)], fill=(25, 20, 18, 255), width=max(1, line - 1))
    elif kind == "corrosion":
        for _ in range(rng.randint(16, 28)):
            x, y = cx + rng.gauss(0, 0.15 * s), cy + rng.gauss(0, 0.15 * s)
            d.ellipse(_box(x, y, s * rng.uniform(0.03, 0.08), s * rng.uniform(0.025, 0.07)),
                      fill=(*rng.choice(RUST), rng.randint(170, 235)))
    elif kind == "scorch":
        for i in range(9):  # translucent rings pile up into a soot mark darkest at its heart
            rr = s * 0.45 * (1 - i / 10)
            d.ellipse(_box(cx + rng.uniform(-0.05, 0.05) * s, cy + rng.uniform(-0.05, 0.05) * s,
                           rr * rng.uniform(0.85, 1.15), rr * rng.uniform(0.75, 1.05)), fill=(30, 20, 10, 52))
        for _ in range(6):
            x, y = cx + rng.gauss(0, 0.12 * s), cy + rng.gauss(0, 0.12 * s)
            d.ellipse(_box(x, y, s * rng.uniform(0.04, 0.09)), fill=(15, 10, 5, 120))
    else:  # dent, lit from the top-left: its upper-left wall is in shadow, its lower-right wall catches light
        rx, ry = s * rng.uniform(0.24, 0.32), s * rng.uniform(0.18, 0.26)
        d.ellipse(_box(cx, cy, rx, ry), fill=(0, 0, 0, 120))
        d.ellipse(_box(cx + 0.22 * rx, cy + 0.22 * ry, 0.82 * rx, 0.82 * ry), fill=(255, 255, 255, 110))
        d.ellipse(_box(cx + 0.1 * rx, cy + 0.1 * ry, 0.55 * rx, 0.55 * ry), fill=(0, 0, 0, 35))
        d.arc(_box(cx, cy, rx * 1.05, ry * 1.05), 300, 120, fill=(255, 255, 255, 160), width=line)


def _draw_panel(truth: dict, pw: int, ph: int, rng: random.Random) -> tuple[Image.Image, dict]:
    """The panel and its layout: where each fact is drawn, in panel pixels (see ``render``)."""
    m = min(pw, ph)
    face = _mix(rng.choice(FACES), (rng.randint(0, 255),) * 3, 0.08)
    # Drawn on RGB with an RGBA pen so translucent marks blend; on an RGBA canvas they would punch holes.
    panel, mask = Image.new("RGB", (pw, ph), face), Image.new("L", (pw, ph), 0)
    ImageDraw.Draw(mask).rounded_rectangle((0, 0, pw - 1, ph - 1), radius=m / 25, fill=255)
    d = ImageDraw.Draw(panel, "RGBA")
    edge = max(1, round(m / 90))
    d.rounded_rectangle((0, 0, pw - 1, ph - 1), radius=m / 25, outline=_mix(face, (0, 0, 0), 0.45),
                        width=edge)
    d.rounded_rectangle((2 * edge, 2 * edge, pw - 1 - 2 * edge, ph - 1 - 2 * edge), radius=m / 30,
                        outline=_mix(face, (255, 255, 255), 0.3), width=1)
    holes = {x["location"] for x in truth["damage"] if x["type"] == "missing_screw"}
    r = 0.026 * m
    for loc, (fx, fy) in SCREWS.items():
        x, y = fx * pw, fy * ph
        if loc in holes:
            d.ellipse(_box(x, y, r * 1.3), fill=_mix(face, (255, 255, 255), 0.25))
            d.ellipse(_box(x, y, r * 0.85), fill=(22, 20, 18))
        else:
            a = rng.uniform(0, math.pi)
            d.ellipse(_box(x, y, r), fill=(172, 172, 178), outline=(85, 85, 90))
            d.line((x - r * math.cos(a), y - r * math.sin(a), x + r * math.cos(a), y + r * math.sin(a)),
                   fill=(60, 60, 65), width=max(1, round(r / 3)))
    # What carries ground truth (code, needle, warning, lamps) is drawn after the damage: soot or rust
    # may surround it but never make it unreadable.
    draw_tag, code_centres = _tag(d, truth["asset_code"], pw, ph, rng)
    late = [draw_tag]
    gx, gy = (0.31 + rng.uniform(-0.02, 0.02)) * pw, (0.525 + rng.uniform(-0.01, 0.01)) * ph
    late.append(_gauge(d, truth["gauge_reading"], gx, gy, 0.19 * m))
    wx, wy = (0.75 + rng.uniform(-0.04, 0.04)) * pw, (0.5 + rng.uniform(-0.04, 0.03)) * ph
    if truth["warning_label"]:
        side = 0.21 * m * rng.uniform(0.9, 1.1)
        late.append(lambda: _warning(d, wx, wy, side))
    elif rng.random() < 0.5:
        _sticker(d, wx, wy, 0.2 * m, rng)
    for item in truth["damage"]:
        _damage(d, item, pw, ph, rng)
    for draw in late:
        draw()
    _lamps(panel, d, truth["lamps"], pw, ph, face)
    panel.putalpha(mask)
    cell = 0.76 * pw / len(truth["lamps"])
    damaged = {item["location"]: item["type"] for item in truth["damage"]}
    # A missing screw shows at its screw hole; every other damage (and "none") is judged at its cell's centre.
    cells = [((SCREWS[loc][0] * pw, SCREWS[loc][1] * ph) if damaged.get(loc) == "missing_screw"
              else ((i % 3 + 0.5) * pw / 3, CELL_ROWS[i // 3] * ph)) for i, loc in enumerate(LOCATIONS)]
    layout = {"code": code_centres, "lamps": [(0.12 * pw + cell * (i + 0.5), 0.785 * ph) for i in range(len(truth["lamps"]))],
              "gauge": [(gx, gy)], "warning": [(wx, wy)], "cells": cells}
    return panel, layout


def _background(size: int, rng: random.Random, nrng: np.random.Generator) -> Image.Image:
    base = tuple(rng.randint(25, 225) for _ in range(3))
    kind = rng.choice(("blotchy", "planks", "tiles"))
    if kind == "blotchy":
        low = np.clip(np.array(base) + nrng.normal(0, 28, (5, 5, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
    else:
        image = Image.new("RGB", (size, size), base)
    d = ImageDraw.Draw(image)
    if kind == "planks":
        pos, vertical, seam = 0.0, rng.random() < 0.5, _mix(base, (0, 0, 0), 0.5)
        while pos < size:
            w = size * rng.uniform(0.1, 0.25)
            shade = _mix(base, (rng.choice((0, 255)),) * 3, rng.uniform(0, 0.2))
            box = (pos, 0, pos + w, size) if vertical else (0, pos, size, pos + w)
            d.rectangle(box, fill=shade, outline=seam)
            pos += w
    elif kind == "tiles":
        step, line = size / rng.randint(3, 7), _mix(base, (rng.choice((0, 255)),) * 3, 0.4)
        for i in range(1, 8):
            d.line((i * step, 0, i * step, size), fill=line, width=max(1, size // 150))
            d.line((0, i * step, size, i * step), fill=line, width=max(1, size // 150))
    for _ in range(rng.randint(2, 6)):  # clutter; the panel is pasted over it, so it stays outside
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), size * rng.uniform(0.04, 0.15)
        shape = rng.choice(("rect", "ellipse", "cable", "polygon"))
        if shape == "rect":
            d.rectangle(_box(x, y, r, r * rng.uniform(0.4, 1.2)), fill=colour)
        elif shape == "ellipse":
            d.ellipse(_box(x, y, r, r * rng.uniform(0.4, 1.2)), fill=colour)
        elif shape == "cable":
            points = [(x, y)] + [(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)]
            d.line(points, fill=colour, width=max(2, round(size * rng.uniform(0.01, 0.03))), joint="curve")
        else:
            d.polygon([(x + rng.uniform(-r, r), y + rng.uniform(-r, r)) for _ in range(4)], fill=colour)
    return image


def _perspective(dst: list[tuple[float, float]], src: list[tuple[float, float]]) -> list[float]:
    # PIL maps output pixels back to input ones, so solve for the homography dst -> src.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    return np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64)).tolist()


def render(truth: dict, size: int, rng: random.Random, nrng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Draw ``truth`` as seen by a handheld camera: placement, tilt, light, blur, noise."""
    scale, aspect = rng.uniform(0.74, 0.92), rng.uniform(0.9, 1.1)
    pw, ph = (round(scale * size), round(scale * size * aspect)) if aspect <= 1 else \
        (round(scale * size / aspect), round(scale * size))
    panel, layout = _draw_panel(truth, pw, ph, rng)
    frame = _background(size, rng, nrng)
    rot, jitter = math.radians(rng.uniform(-7, 7)), 0.03 * size
    rel = [((x - pw / 2) * math.cos(rot) - (y - ph / 2) * math.sin(rot) + rng.uniform(-jitter, jitter),
            (x - pw / 2) * math.sin(rot) + (y - ph / 2) * math.cos(rot) + rng.uniform(-jitter, jitter))
           for x, y in ((0, 0), (pw, 0), (pw, ph), (0, ph))]
    centre = []
    for axis in (0, 1):  # keep every corner in frame when the panel's size allows it
        lo, hi = 1 - min(p[axis] for p in rel), size - 1 - max(p[axis] for p in rel)
        centre.append(rng.uniform(lo, hi) if lo < hi else size / 2)
    dst = [(centre[0] + x, centre[1] + y) for x, y in rel]
    corners = [(0, 0), (pw, 0), (pw, ph), (0, ph)]
    coeffs = _perspective(dst, corners)
    warped = panel.transform((size, size), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC)
    shadow = Image.new("L", (size, size), 0)
    offset = (round(0.012 * size), round(0.018 * size))
    shadow.paste(warped.getchannel("A").point(lambda a: a * 2 // 5), offset)
    frame.paste((0, 0, 0), mask=shadow)
    frame.paste(warped, mask=warped)
    blur = rng.uniform(0, 0.9) * size / 336
    if blur > 0.2:
        frame = frame.filter(ImageFilter.GaussianBlur(blur))
    brightness, contrast, sigma = rng.uniform(0.7, 1.25), rng.uniform(0.75, 1.2), rng.uniform(1, 7)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    gain = brightness * (1 + rng.uniform(-0.2, 0.2) * ramp[None, :] + rng.uniform(-0.2, 0.2) * ramp[:, None])
    cast = np.array([rng.uniform(0.93, 1.07) for _ in range(3)], dtype=np.float32)
    pixels = ((np.asarray(frame, dtype=np.float32) - 128) * contrast + 128) * gain[..., None] * cast
    pixels += nrng.standard_normal(pixels.shape, dtype=np.float32) * sigma
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    camera = {"panel_scale": round(scale, 3), "rotation_deg": round(math.degrees(rot), 2),
              "blur": round(blur, 2), "brightness": round(brightness, 3), "contrast": round(contrast, 3),
              "noise_sigma": round(sigma, 2), "layout": _project(layout, _perspective(corners, dst))}
    return image, camera


def _project(layout: dict, coeffs: list[float]) -> dict:
    """Panel points -> image pixels through the panel's homography, so each fact can be found in the picture."""
    a, b, c, d, e, f, g, h = coeffs

    def point(x: float, y: float) -> list[float]:
        w = g * x + h * y + 1
        return [round((a * x + b * y + c) / w, 1), round((d * x + e * y + f) / w, 1)]
    return {name: [point(x, y) for x, y in points] for name, points in layout.items()}
