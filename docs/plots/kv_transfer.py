"""Plots KV transfer time per sequence, gRPC against device to device, from `pdfleet experiment`
summaries: end-to-end (from the prompt's last step to the decode worker's acknowledgement) and,
for device to device, the GPU copy alone.

Usage: python3 docs/plots/kv_transfer.py OUT.png LABEL=DIR [LABEL=DIR ...]
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

out, runs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
labels, grpc, device, copy, mb = [], [], [], [], []
for label, folder in runs:
    summary = json.load(open(os.path.join(folder, "summary.json")))
    # Whole-prefill arms: one transfer right after each prompt.
    arms = {tuple(a["kv_transfer"]["transports"]): a["kv_transfer"] for a in summary["arms"]
            if a["mode"] == "Disaggregated" and not a["chunked"]}
    g, d = arms[("grpc",)], arms[("device",)]
    labels.append(label)
    grpc.append(1e3 * g["seconds"] / g["transfers"])
    device.append(1e3 * d["seconds"] / d["transfers"])
    copy.append(1e3 * d["device_copy_seconds"] / d["transfers"])
    mb.append(d["bytes"] / d["transfers"] / 1e6)
fig, ax = plt.subplots(figsize=(10, 4.5))
x = range(len(labels))
w = 0.27
ax.bar([i - w for i in x], grpc, w, color="tab:orange", label="gRPC, end to end")
ax.bar(list(x), device, w, color="tab:green", label="device to device, end to end")
ax.bar([i + w for i in x], copy, w, color="tab:olive", label="device to device, GPU copy alone")
for i in x:
    ax.text(i - w, grpc[i], f"{grpc[i]:.1f}", ha="center", va="bottom", fontsize=8)
    ax.text(i, device[i], f"{device[i]:.2f}", ha="center", va="bottom", fontsize=8)
    ax.text(i + w, copy[i], f"{copy[i]:.3f}", ha="center", va="bottom", fontsize=8)
ax.set_xticks(list(x))
ax.set_xticklabels([f"{l}\n{m:.1f} MB/seq" for l, m in zip(labels, mb)], fontsize=8)
ax.set_yscale("log")
ax.set_ylim(top=max(grpc) * 6)  # room for the legend above the bars
ax.set_ylabel("ms per sequence (mean)")
ax.grid(alpha=0.3, axis="y")
ax.legend(fontsize=8, loc="upper left", ncols=3)
ax.set_title("KV transfer per sequence, prefill worker to decode worker (whole-prefill arms)")
fig.tight_layout()
fig.savefig(out, dpi=110)
