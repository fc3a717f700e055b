"""Print an adherence table (Markdown) from `pixsigma eval adherence --json` reports.

    python scripts/adherence_table.py "shipped, 20 steps=runs/toy/adherence_20.json" \
        "shipped, 10 steps=runs/toy/adherence_10.json" "before the KV stage=runs/toy/adherence_pre_kv.json"

Each argument is LABEL=PATH; rows come out in argument order, so the tables in the README, the
model card and docs/ are exactly what the reports say.
"""

from __future__ import annotations

import json
import sys

COLUMNS = [  # (header, where in the report)
    ("single: color", ("single_attributes", "color")),
    ("shape", ("single_attributes", "shape")),
    ("position", ("single_attributes", "position")),
    ("all three", ("single_attributes", "all")),
    ("two objects, both colors (color_attr)", ("categories", "color_attr", "accuracy")),
    ("counting", ("categories", "counting", "accuracy")),
    ("two objects (shapes)", ("categories", "two_objects", "accuracy")),
    ("relative position", ("categories", "position", "accuracy")),
    ("colors", ("categories", "colors", "accuracy")),
    ("overall", ("overall",)),
]


def _get(report: dict, path: tuple):
    for key in path:
        report = report[key]
    return report


def table(rows: list[tuple[str, dict]]) -> str:
    head = ["model", "steps", "seeds"] + [h for h, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, report in rows:
        s = report["settings"]
        cells = [label, str(s["steps"]), str(len(s["seeds"]))] + [f"{100 * _get(report, p):.1f}%" for _, p in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv):
        print("usage: adherence_table.py LABEL=REPORT.json [LABEL=REPORT.json ...]", file=sys.stderr)
        return 2
    rows = []
    for arg in argv:
        label, path = arg.split("=", 1)
        try:
            with open(path) as f:
                rows.append((label, json.load(f)))
        except (OSError, json.JSONDecodeError) as e:
            print(f"cannot read report {path!r}: {e}", file=sys.stderr)
            return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
