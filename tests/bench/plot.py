"""Draws accepted appends/s against p50/p99 accept latency as the offered rate rises, from the
JSON that sessions-bench writes. Usage: plot.py <latest.json> <out.png>"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

source, target = sys.argv[1], sys.argv[2]
document = json.load(open(source))
sweep = sorted(document["sweep"], key=lambda point: point["offered_per_second"])
accepted = [point["accepted_per_second"] for point in sweep]
figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
axis.plot(accepted, [point["p50_ms"] for point in sweep], marker="o", label="p50 accept latency")
axis.plot(accepted, [point["p99_ms"] for point in sweep], marker="o", label="p99 accept latency")
summary = document["summary"]
for key, label in (("pipeline_floor_per_second", "pipeline floor"),
                   ("durable_streams_per_second", "Durable Streams (wal)")):
    if summary.get(key):
        axis.axvline(summary[key], linestyle="--", linewidth=1, color="grey")
        axis.text(summary[key], axis.get_ylim()[1] * 0.9, " " + label, fontsize=8, color="grey")
axis.set_xlabel("accepted appends/s (open loop, offered rate rising)")
axis.set_ylabel("accept latency (ms)")
axis.set_yscale("log")
axis.set_title(f"sessions on 2 cores, {document['date'][:10]}")
axis.grid(True, which="both", alpha=0.3)
axis.legend()
figure.tight_layout()
import os  # noqa: E402

os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
figure.savefig(target)
print(f"wrote {target}")
