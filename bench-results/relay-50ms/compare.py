"""Per-prompt tok/s and round time with no server relayed vs the last of 4 servers relayed.

Run: python bench-results/relay-50ms/compare.py (reads relayed0/ and relayed1/results.json here)."""
import json
from pathlib import Path

here = Path(__file__).parent


def rows(name):
    data = json.loads((here / name / "results.json").read_text())
    recs = data["prompts"]
    return {(r["dataset"], r["problem_id"], r["mode"]): r for r in recs if not r.get("error")}


none, one = rows("relayed0"), rows("relayed1")
print("| prompt | mode | tok/s, none relayed | tok/s, 1 of 4 relayed | ratio | round ms, none | round ms, 1 relayed |")
print("|---|---|---|---|---|---|---|")
for key in sorted(set(none) & set(one)):
    a, b = none[key], one[key]
    ra, rb = 1000 * a["decode_s"] / max(a["rounds"], 1), 1000 * b["decode_s"] / max(b["rounds"], 1)
    print(f"| {key[0]}/{key[1]} | {key[2]} | {a['tokens_per_s']:.3f} | {b['tokens_per_s']:.3f} | "
          f"{b['tokens_per_s'] / a['tokens_per_s']:.2f} | {ra:.0f} | {rb:.0f} |")
