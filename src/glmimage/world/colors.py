"""Named colour palette of the synthetic world and the CIE Lab distance used to keep colours apart."""

from __future__ import annotations

import math

# sRGB values chosen so that every pair is far apart in Lab (min ΔE76 ≈ 40, checked in tests).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (30, 150, 50),
    "blue": (30, 90, 230),
    "yellow": (250, 220, 30),
    "orange": (250, 135, 20),
    "purple": (130, 30, 150),
    "pink": (250, 140, 200),
    "cyan": (40, 205, 230),
    "white": (255, 255, 255),
    "black": (20, 20, 20),
    "brown": (115, 65, 25),
    "gray": (128, 128, 128),
}

# Object colours must differ from the background by this much (ΔE76, standard Lab units); this rules out the
# closest palette pairs (blue/purple, brown/gray, red/orange) as object-on-background.
MIN_CONTRAST = 45.0
# Text must differ from the background by this much in lightness L* (OCR needs luminance contrast).
MIN_TEXT_LIGHTNESS = 40.0


def _linear(c: float) -> float:
    """sRGB channel in [0, 1] → linear light."""
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def rgb_to_lab(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    """sRGB (0–255) → CIE Lab (D65): L in [0, 100], a/b roughly ±128."""
    r, g, b = (_linear(v / 255.0) for v in rgb)
    x = (0.4124564 * r + 0.3575761 * g + 0.1804375 * b) / 0.95047
    y = 0.2126729 * r + 0.7151522 * g + 0.0721750 * b
    z = (0.0193339 * r + 0.1191920 * g + 0.9503041 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116

    fx, fy, fz = f(x), f(y), f(z)
    return (116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz))


def lab_distance(rgb1: tuple[float, float, float], rgb2: tuple[float, float, float]) -> float:
    """ΔE76 between two sRGB colours."""
    return math.dist(rgb_to_lab(rgb1), rgb_to_lab(rgb2))


def mix(rgb: tuple[float, float, float], other: tuple[float, float, float], t: float) -> tuple[int, int, int]:
    """Linear blend in sRGB: t=0 gives rgb, t=1 gives other."""
    return tuple(round(a + (b - a) * t) for a, b in zip(rgb, other))  # type: ignore[return-value]


def color_rgb(name: str) -> tuple[int, int, int]:
    """RGB of a palette colour; ValueError naming the palette on an unknown name."""
    if name not in PALETTE:
        raise ValueError(f"unknown colour {name!r}; valid: {sorted(PALETTE)}")
    return PALETTE[name]
