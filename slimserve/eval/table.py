"""The quality table (markdown) and the size-versus-perplexity plot (PNG)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slimserve.eval.metrics import Quality


@dataclass
class Row:
    name: str
    size_bytes: int
    quality: Quality
    calibration: str = "-"


def markdown(rows: list[Row], text_name: str) -> str:
    lines = [
        f"Perplexity on {text_name}; KL divergence and top-1 agreement against the reference.",
        "",
        "| model | calibration | size (MB) | perplexity | vs reference | KL (nats/token) | top-1 agreement | tokens |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    reference = next((r.quality.perplexity for r in rows if r.quality.kl_divergence is None), None)
    for r in rows:
        q = r.quality
        kl = "-" if q.kl_divergence is None else f"{q.kl_divergence:.4f}"
        top1 = "-" if q.top1_agreement is None else f"{100 * q.top1_agreement:.2f}%"
        size = f"{r.size_bytes / 2**20:.1f}"
        rise = "-" if q.kl_divergence is None or not reference else f"{100 * (q.perplexity / reference - 1):+.2f}%"
        lines.append(
            f"| {r.name} | {r.calibration} | {size} | {q.perplexity:.3f} | {rise} | {kl} | {top1} | {q.tokens} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        marker = "*" if r.quality.kl_divergence is None else "o"
        ax.scatter(r.size_bytes / 2**20, r.quality.perplexity, marker=marker, s=80)
        ax.annotate(
            r.name, (r.size_bytes / 2**20, r.quality.perplexity), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xlabel("model size (MB, floats counted at 16 bits)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
