"""Corruption names: the 15 benchmark domains and the 4 held-out ones.

Anything trained or tuned (the MGG, Tune searches) sees the held-out four only;
reported errors are on the fifteen.
"""
BENCHMARK_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
)
HELD_OUT_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = BENCHMARK_CORRUPTIONS + HELD_OUT_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


def check_corruption_names(names) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in ALL_CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {unknown}; known: {', '.join(ALL_CORRUPTIONS)}")
    return names


def check_severities(severities) -> list[int]:
    severities = list(severities)
    bad = [s for s in severities if s not in SEVERITIES]
    if bad:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {bad}")
    return severities
