"""Plots `pdfleet-worker bench --sweep --json` output: decode KV bandwidth and prefill throughput.

Usage: python3 docs/plots/engine_bench.py docs/data/h200-bench.json docs/engine-sweep.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = json.load(open(sys.argv[1]))
fig, (ax_d, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
for name, ax, key, label in [
    ("sweep decode", ax_d, "kv_gbs", "KV read bandwidth (GB/s)"),
    ("sweep prefill", ax_p, "tokens_per_s", "prefill tokens/s"),
]:
    sweep = [r for r in rows if r["name"] == name]
    for batch in sorted({r["batch"] for r in sweep}):
        pts = sorted((r["prompt_len"], r[key]) for r in sweep if r["batch"] == batch)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {batch:,}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
ax_d.axhline(4800, color="grey", linestyle="--", linewidth=1)
ax_d.text(64, 4850, "H200 peak 4.8 TB/s", fontsize=8, color="grey")
ax_d.set_title("decode: attention reads the paged KV cache")
ax_p.set_title("prefill: whole prompts per step")
fig.suptitle("pdfleet CUDA engine on one H200 (toy model, f32 KV, block size 16)")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
