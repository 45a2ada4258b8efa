"""Print mean ± std (over seeds) of foreground Dice / IoU for run folders named INIT_seedN.

Usage: python experiments/aggregate.py OUT_DIR  → a markdown table (also written to OUT_DIR/results.md).
"""
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

out = Path(sys.argv[1])
rows = defaultdict(list)
for m in sorted(out.glob("*_seed*/eval_test/metrics.json")):
    init = re.sub(r"_seed\d+$", "", m.parent.parent.name)
    d = json.loads(m.read_text())
    rows[init].append((d["dice"]["mean"], d["iou"]["mean"]))
lines = ["| init | seeds | Dice (mean ± std) | IoU (mean ± std) | Dice per seed |", "|---|---|---|---|---|"]
for init, vals in rows.items():
    a = np.array(vals)
    sd = a.std(0, ddof=1) if len(a) > 1 else np.zeros(2)
    lines.append(f"| {init} | {len(a)} | {a[:, 0].mean():.3f} ± {sd[0]:.3f} | {a[:, 1].mean():.3f} ± {sd[1]:.3f} | "
                 f"{', '.join(f'{v:.3f}' for v in a[:, 0])} |")
text = "\n".join(lines) + "\n"
(out / "results.md").write_text(text)
print(text)
