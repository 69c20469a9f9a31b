"""The table and ratios both training-throughput benchmarks print (imported by them; not a benchmark itself)."""

from __future__ import annotations


def print_throughput_table(settings: dict, decimals: int) -> tuple[float, float]:
    """Each setting's best round (round 0 warms up) for makd's loop and the bare one; returns (worst makd / bare,
    aspect overhead = CE-only / MaKD images per second - 1). Settings: "CE only" first, "CE + aspects (MaKD)" second."""
    rows = [(name, max(s.makd[1:]), max(s.bare[1:])) for name, s in settings.items()]
    print("| setting | makd images/s | bare loop images/s | makd / bare |")
    print("|---|---|---|---|")
    for name, makd, bare in rows:
        print(f"| {name} | {makd:.{decimals}f} | {bare:.{decimals}f} | {makd / bare:.3f} |")
    return min(makd / bare for _, makd, bare in rows), rows[0][1] / rows[1][1] - 1.0
