"""Plots a `pdfleet experiment` folder: per-request TTFT and worst inter-token gap, as CDFs.

Usage: python3 docs/plots/serving_experiment.py DIR OUT.png "title"
"""
import csv
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

folder, out, title = sys.argv[1], sys.argv[2], sys.argv[3]
summary = json.load(open(os.path.join(folder, "summary.json")))
fig, (ax_t, ax_i) = plt.subplots(1, 2, figsize=(12, 4.5))
styles = {(True, False): "-", (True, True): "--", (False, False): "-", (False, True): "--"}
for arm in summary["arms"]:
    rows = [r for r in csv.DictReader(open(os.path.join(folder, os.path.basename(arm["csv"])))) if r["outcome"] == "ok"]
    # Colocated blue; disaggregated orange with KV over gRPC, green device to device.
    transports = arm.get("kv_transfer", {}).get("transports", [])
    colour = "tab:blue" if arm["mode"] == "Colocated" else ("tab:green" if transports == ["device"] else "tab:orange")
    style = "--" if arm["chunked"] else "-"
    for ax, key in [(ax_t, "ttft_ms"), (ax_i, "p99_itl_ms")]:
        vals = sorted(float(r[key]) for r in rows if r[key])
        if vals:
            ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], style, color=colour, label=arm["name"])
for ax, label in [(ax_t, "time to first token (ms)"), (ax_i, "request's p99 inter-token gap (ms)")]:
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
ax_i.axvline(summary["slo_itl_ms"], color="grey", linestyle=":", linewidth=1)
ax_t.legend(fontsize=8, loc="lower right")
fig.suptitle(f"{title}: {summary['requests']} requests at {summary['rate']}/s, prompts {summary['prompt_len']}, output {summary['output_len']}")
fig.tight_layout()
fig.savefig(out, dpi=110)
