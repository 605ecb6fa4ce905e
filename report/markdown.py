"""report.md: the run's header, each stage's section in pipeline order, the summary table, time, cost and plots."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from nanochat.common import atomic_write_text
from report import BASE_EVALUATION, PLAN_FILE, SECTIONS, Report, chat_evaluation, now_iso
from report.plots import make_plots

MISSING = "—"
# (row label, key the evaluation logs) and (column label, section that holds that column's numbers)
SUMMARY_METRICS = [("CORE", "CORE metric"), ("ARC-Easy", "ARC-Easy"), ("ARC-Challenge", "ARC-Challenge"),
                   ("MMLU", "MMLU"), ("GSM8K", "GSM8K"), ("HumanEval", "HumanEval"), ("ChatCORE", "ChatCORE metric")]
SUMMARY_COLUMNS = [("BASE", BASE_EVALUATION), ("MID", chat_evaluation("mid")), ("SFT", chat_evaluation("sft")),
                   ("RL", chat_evaluation("rl"))]
# 8xH100 rents for about $24/hour; the report states this assumption next to the number.
DEFAULT_GPU_HOUR_COST = 3.0


def format_value(value) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60}m {rest % 60}s" if hours else f"{rest // 60}m {rest % 60}s"


def section_values(record: dict | None) -> dict:
    """All key/value items of a section merged into one dict (a section's data is a list of dicts and strings)."""
    values = {}
    for item in (record or {}).get("data", []):
        if isinstance(item, dict):
            values.update(item)
    return values


# -----------------------------------------------------------------------------
# Header


def render_header(header: dict | None) -> list[str]:
    if header is None:
        return ["No run header: start a run with `python -m report reset` to record the date, code and hardware.", ""]
    git, hardware, software, code = header["git"], header["hardware"], header["software"], header["code"]
    dirty = {True: "uncommitted changes", False: "clean", None: "unknown"}[git["dirty"]]
    gpus = hardware["gpus"]
    if gpus["count"]:
        names = sorted({f"{d['name']} ({d['memory_gib']} GiB)" for d in gpus["devices"]})
        gpu_text = f"{gpus['count']} × {', '.join(names)}"
    else:
        gpu_text = "none (CPU run)"
    software_line = (f"- Software: Python {software['python']}, PyTorch {software['torch']}, "
                     f"CUDA {software['cuda'] or 'none'} (torch build), {software['rustc'] or 'rustc not found'}")
    code_line = (f"- Code: {code['files']:,} source files, {code['lines']:,} lines, {code['characters']:,} characters; "
                 f"{code['dependencies']} runtime dependencies")
    return [
        f"Run started: {header['timestamp']}",
        "",
        "## Environment",
        "",
        f"- Git: commit {git['commit']} on branch {git['branch']}, working tree {dirty}",
        f"- CPU: {hardware['cpu']} ({hardware['cpu_cores']} cores)",
        f"- Memory: {hardware['memory_gib']} GiB",
        f"- GPUs: {gpu_text}",
        software_line,
        f"- Platform: {software['platform']}",
        code_line,
        "",
    ]


# -----------------------------------------------------------------------------
# Sections


def render_section(name: str, record: dict | None) -> list[str]:
    lines = [f"## {name}", ""]
    if record is None:
        return [*lines, f"{MISSING} missing: this stage logged nothing (not run, or did not finish).", ""]
    lines += [f"timestamp: {record['timestamp']}", ""]
    for item in record["data"]:
        if isinstance(item, dict):
            lines += [f"- {key}: {format_value(value)}" for key, value in item.items()]
        else:
            lines.append(str(item))
        lines.append("")
    return lines


# -----------------------------------------------------------------------------
# Summary, time and cost


def render_summary(sections: dict[str, dict]) -> list[str]:
    columns = [(label, section_values(sections.get(section)), section in sections)
               for label, section in SUMMARY_COLUMNS]
    lines = ["## Summary", "", "| Metric | " + " | ".join(label for label, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for row_label, key in SUMMARY_METRICS:
        cells = []
        for _, values, _ in columns:
            value = values.get(key)
            cells.append(format_value(float(value)) if isinstance(value, (int, float)) else MISSING)
        lines.append(f"| {row_label} | " + " | ".join(cells) + " |")
    lines.append("")
    not_run = [f"{label} ({section})" for (label, section), (_, _, ran) in zip(SUMMARY_COLUMNS, columns) if not ran]
    if not_run:
        lines += [f"{MISSING} in a column whose evaluation was not run: {', '.join(not_run)}.", ""]
    lines += [f"{MISSING} in a column whose evaluation ran: that metric was not measured for that model.", ""]
    return lines


def wall_clock_seconds(header: dict | None, sections: dict[str, dict]) -> float | None:
    if header is None or not sections:
        return None
    start = datetime.fromisoformat(header["timestamp"])
    end = max(datetime.fromisoformat(record["timestamp"]) for record in sections.values())
    return (end - start).total_seconds()


def render_time_and_cost(header: dict | None, sections: dict[str, dict], gpu_hour_cost: float,
                         plan: dict | None = None) -> list[str]:
    seconds = wall_clock_seconds(header, sections)
    if seconds is None:
        return ["- Total wall-clock time: unknown (needs the run header and at least one logged section).", ""]
    lines = [f"- Total wall-clock time: {format_duration(seconds)} "
             + "(from `report reset` to the last logged section, including any time the run was interrupted)"]
    if plan:
        lines.append(f"- Estimated before the run (`speedrun.sh --plan`, {plan['hardware']}, depth {plan['depth']}): "
                     f"{format_duration(plan['total_seconds'])}; actual / estimate = "
                     f"{seconds / plan['total_seconds']:.2f}")
    gpu_count = header["hardware"]["gpus"]["count"]
    if gpu_count:
        cost = seconds / 3600 * gpu_count * gpu_hour_cost
        lines.append(f"- Estimated cost: ${cost:,.2f} ({gpu_count} GPUs × {seconds / 3600:.2f} h × "
                     f"${gpu_hour_cost:.2f} per GPU-hour, an assumed price; change it with `--gpu-hour-cost`)")
    else:
        lines.append("- Estimated cost: no GPU cost (the run used no GPU; CPU time is not priced)")
    return [*lines, ""]


def read_plan(path: Path) -> dict | None:
    """The estimate speedrun.sh saved from nanochat/plan.py when the run started; None if absent or unreadable."""
    try:
        plan = json.loads(path.read_text())
        return plan if isinstance(plan, dict) and plan.get("total_seconds", 0) > 0 else None
    except (OSError, ValueError):
        return None


# -----------------------------------------------------------------------------
# The whole report


def generate(report: Report, out_path: Path, gpu_hour_cost: float = DEFAULT_GPU_HOUR_COST) -> Path:
    """Write report.md (and its plots beside it) from the report directory; returns the markdown's path."""
    out_path = Path(out_path)
    header = report.read_header()
    sections = report.read_sections()
    extra = sorted((name for name in sections if name not in SECTIONS), key=lambda name: sections[name]["timestamp"])

    lines = ["# nanochat training report", "", f"Generated: {now_iso()}", *render_header(header)]
    for name in [*SECTIONS, *extra]:
        lines += render_section(name, sections.get(name))
    lines += render_summary(sections)
    lines += render_time_and_cost(header, sections, gpu_hour_cost, read_plan(report.report_dir / PLAN_FILE))

    lines += ["## Plots", ""]
    plots = make_plots(report.read_metrics(), out_path.with_suffix(""))
    if not plots:
        lines += [f"{MISSING} no training metrics were logged, so there is nothing to plot.", ""]
    for title, path in plots:
        lines += [f"![{title}]({path.name})", ""]

    atomic_write_text(out_path, "\n".join(lines).rstrip() + "\n")
    return out_path
