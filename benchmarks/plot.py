"""Charts from the benchmark JSON files (needs matplotlib, in the `bench` extra).

python benchmarks/plot.py    # reads benchmarks/*.json, writes benchmarks/*.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def plot_switch(data: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dtype, marker in (("float32", "o"), ("bfloat16", "s")):
        ours = [r for r in data["rows"] if r["method"] == "neuroada" and r["dtype"] == dtype]
        for op, style in (("switch, shared index set", "-"), ("restore+apply, own index sets", "--")):
            sel = [r for r in ours if r["op"] == op]
            if not sel:
                continue
            ax.plot(
                [r["params"] for r in sel],
                [r["seconds"]["median"] * 1e3 for r in sel],
                style,
                marker=marker,
                label=f"NeuroAda {op} ({dtype})",
            )
            for r in sel:
                ax.annotate(
                    f"k={r['k']}",
                    (r["params"], r["seconds"]["median"] * 1e3),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, -10 if style == "-" else 4),
                )
        lora = [
            r
            for r in data["rows"]
            if r["method"].startswith("lora") and r["dtype"] == dtype and r["op"] == "merge+unmerge"
        ]
        if lora:
            ax.scatter(
                [r["params"] for r in lora],
                [r["seconds"]["median"] * 1e3 for r in lora],
                marker="x",
                s=60,
                label=f"LoRA r=8/16 merge+unmerge ({dtype})",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel("whole-model switch, ms (median)")
    ax.set_title(f"Adapter switch on SmolLM2-135M\n{data['machine']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def plot_serve(data: dict, out: Path) -> None:
    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(10, 4.2))
    rows = data["rows"]
    engines = list(dict.fromkeys(r.get("engine", "neuroada") for r in rows))
    colors = dict(zip(engines, ("tab:blue", "tab:orange", "tab:red", "tab:green")))
    for conc in sorted({r["concurrency"] for r in rows}):
        base = next((r for r in rows if r["adapters"] == 0 and r["concurrency"] == conc), None)
        for engine in engines:
            for traffic, style in (("uniform", "-o"), ("zipf", "--s")):
                sel = sorted(
                    (
                        r
                        for r in rows
                        if r.get("engine", "neuroada") == engine
                        and r["traffic"] == traffic
                        and r["concurrency"] == conc
                    ),
                    key=lambda r: r["adapters"],
                )
                if not sel:
                    continue
                xs = [r["adapters"] for r in sel]
                label = f"{engine}, {traffic}, conc {conc}"
                alpha = 1.0 if conc == max(r["concurrency"] for r in rows) else 0.45
                tput.plot(xs, [r["tokens_per_s"] for r in sel], style, color=colors[engine], alpha=alpha, label=label)
                ttft.plot(xs, [r["ttft_p99"] for r in sel], style, color=colors[engine], alpha=alpha, label=label)
        if base:
            tput.axhline(base["tokens_per_s"], color="gray", lw=0.8, ls=":")
            ttft.axhline(base["ttft_p99"], color="gray", lw=0.8, ls=":")
    tput.set_xscale("log", base=2)
    ttft.set_xscale("log", base=2)
    tput.set_xlabel("adapters in traffic")
    ttft.set_xlabel("adapters in traffic")
    tput.set_ylabel("output tokens/s (dotted: base only)")
    ttft.set_ylabel("p99 time to first token, s (dotted: base only)")
    tput.legend(fontsize=6)
    ttft.set_yscale("log")
    fig.suptitle(
        f"serving under load (neuroada mixed / one adapter per batch / PEFT-LoRA engine)\n{data['machine']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def plot_many_adapters(data: dict, out: Path) -> None:
    rows = data["rows"]
    labels = [f"{r['scenario']}\n{r['hot']} hot / {r['adapters']}" for r in rows]
    xs = range(len(rows))
    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(11, 4.5))
    tput.bar(xs, [r["tokens_per_s"] for r in rows], color="tab:blue")
    tput.set_ylabel("output tokens/s")
    width = 0.38
    for offset, key, label, color in (
        (-width / 2, "hit", "resident (hit)", "tab:green"),
        (width / 2, "miss", "loaded (miss)", "tab:red"),
    ):
        ttft.bar(
            [x + offset for x in xs],
            [r[f"ttft_{key}_p99"] or 0 for r in rows],
            width,
            color=color,
            label=f"p99 TTFT, adapter {label}",
        )
    ttft.set_ylabel("p99 time to first token, s")
    ttft.legend(fontsize=7)
    for ax in (tput, ttft):
        ax.set_xticks(list(xs), labels, fontsize=7)
    fig.suptitle(f"thousands of adapters, tiered residency\n{data['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    for name, fn in (("switch", plot_switch), ("serve_load", plot_serve), ("many_adapters", plot_many_adapters)):
        path = HERE / f"{name}.json"
        if path.exists():
            fn(json.loads(path.read_text()), HERE / f"{name}.png")


if __name__ == "__main__":
    main()
