"""Training curves for report.md: each logged metric against step and against training FLOPs, one line per stage."""

from __future__ import annotations

import io
import re
from pathlib import Path

from nanochat.common import atomic_write_bytes

# metric key in the metrics JSONL -> axis label; a metric no stage logged gets no plot.
PLOTTED_METRICS = {
    "train_loss": "training loss",
    "val_bpb": "validation bits per byte",
    "val_loss": "validation loss",
    "core_metric": "CORE metric",
    "reward": "mean reward",
    "pass@1": "GSM8K pass@1",
}
STAGE_ORDER = ["base_train", "mid_train", "chat_sft", "chat_rl"]


def stage_sort_key(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


def make_plots(metrics: dict[str, list[dict]], out_stem: Path) -> list[tuple[str, Path]]:
    """Write `<out_stem>_<metric>.png` per plotted metric; returns (title, path) for the markdown to link."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    plots = []
    for metric, label in PLOTTED_METRICS.items():
        series = {stage: [row for row in rows if isinstance(row.get(metric), (int, float))]
                  for stage, rows in metrics.items()}
        series = {stage: rows for stage, rows in series.items() if rows}
        if not series:
            continue
        fig, (ax_step, ax_flops) = plt.subplots(1, 2, figsize=(11, 4))
        for stage in sorted(series, key=stage_sort_key):
            rows = series[stage]
            marker = "o" if len(rows) < 20 else None  # a handful of eval points is unreadable as a bare line
            ax_step.plot([row["step"] for row in rows], [row[metric] for row in rows], label=stage, marker=marker)
            with_flops = [row for row in rows if isinstance(row.get("total_flops"), (int, float))]
            if with_flops:
                ax_flops.plot([row["total_flops"] for row in with_flops], [row[metric] for row in with_flops],
                              label=stage, marker=marker)
        ax_step.set_xlabel("step")
        ax_flops.set_xlabel("training FLOPs (per stage)")
        for ax in (ax_step, ax_flops):
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend()
        fig.suptitle(f"{label} against step and FLOPs")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        path = out_stem.parent / f"{out_stem.name}_{re.sub(r'[^A-Za-z0-9]+', '_', metric)}.png"
        atomic_write_bytes(path, buffer.getvalue())
        plots.append((label, path))
    return plots
