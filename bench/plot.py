"""Latency against offered load, from bench/results/<store>.json (written by `cargo bench --bench load`).

    bench/.venv/bin/python bench/plot.py   # writes bench/results/latency.png
"""
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = pathlib.Path(__file__).parent / "results"
fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
for store, color in (("sqlite", "tab:blue"), ("postgres", "tab:orange")):
    path = results / f"{store}.json"
    if not path.exists():
        continue
    curve = json.loads(path.read_text())["latency_curve"]
    rates = [p["offered_per_s"] for p in curve]
    for key, style in (("p50_ms", "--"), ("p99_ms", "-"), ("p999_ms", ":")):
        ax.plot(rates, [p[key] for p in curve], style, color=color, marker="o", markersize=3,
                label=f"{store} {key.removesuffix('_ms')}")
ax.axhline(10, color="grey", linewidth=0.8)
ax.annotate("p99 target 10 ms", (ax.get_xlim()[0], 10), textcoords="offset points", xytext=(4, 4), color="grey")
ax.axvline(1000, color="grey", linewidth=0.8, linestyle="--")
ax.set_yscale("log")
ax.set_xlabel("offered load (webhooks/s, open loop)")
ax.set_ylabel("intake latency (ms, from the scheduled send time)")
ax.set_title("ordercloud-cdp-forwarder intake latency vs offered load (2 cores, load generator on the same machine)")
ax.title.set_fontsize(9)
ax.grid(True, which="both", linewidth=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
out = results / "latency.png"
fig.savefig(out)
print(f"wrote {out}")
