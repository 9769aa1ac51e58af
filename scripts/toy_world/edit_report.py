"""The toy-world score tables: mean scores per method (all edits, colour-only, shape-changing) and the paired
per-edit consistency comparison. Rows are toy_world_edit's results (one dict per edit)."""
from __future__ import annotations

import build_toy_world

METHODS = {"tune_a_video": "Tune-A-Video (toy settings, feature injection)",
           "no_injection": "Tune-A-Video, no feature injection (same tuned model)",
           "no_inversion": "Tune-A-Video, random start noise", "per_frame": "untuned, unpatched, per-frame inversion"}
IDEAL = "a perfect edit through the VAE (the floor; no model)"


def edit_kind(r) -> str:
    (c0, s0), (c1, s1) = (build_toy_world.load_pack_modules()[0].parse_prompt(r[k]) for k in ("source", "edited"))
    return "colour" if s0 == s1 else "shape" if c0 == c1 else "both"


def table(rows) -> str:
    """Markdown: mean scores per method over all edits, and over colour-only / shape-changing edits."""
    keys = ("edit_accuracy", "colour_accuracy", "shape_accuracy", "motion_error_px", "colour_spread",
            "size_spread", "background_kept")
    lines = ["| method | edits | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    groups = {"all": rows, "colour only": [r for r in rows if edit_kind(r) == "colour"],
              "shape changed": [r for r in rows if edit_kind(r) != "colour"]}
    for method, label in {**METHODS, "ideal": IDEAL}.items():
        if method not in rows[0]:
            continue
        for group, rs in groups.items():
            if rs and (group == "all" or len(rs) < len(rows)):
                means = [sum(r[method][k] for r in rs) / len(rs) for k in keys]
                lines.append(f"| {label} | {group} ({len(rs)}) | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines)


def paired(rows, method="tune_a_video", baseline="per_frame") -> str:
    """Consistency edit by edit: method minus baseline spread (mean, median, how often the method's is lower)."""
    lines = []
    for key in ("colour_spread", "size_spread"):
        d = sorted(r[method][key] - r[baseline][key] for r in rows if method in r and baseline in r)
        if d:
            median = (d[(len(d) - 1) // 2] + d[len(d) // 2]) / 2
            lines.append(f"{key}, {method} minus {baseline}, per edit: mean {sum(d) / len(d):+.4f}, median "
                         f"{median:+.4f}, lower in {sum(x < 0 for x in d)} of {len(d)}")
    return "\n".join(lines)
