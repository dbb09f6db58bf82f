"""Evaluation reports: a Markdown table and a PNG chart beside the predictions (matplotlib, no display)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llavamed_fast.data.durable import write_atomic

VQA_COLUMNS = {
    "closed_accuracy": "closed accuracy",
    "open_recall": "open recall",
    "open_f1": "open F1",
    "open_exact": "open exact",
}


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def vqa_markdown(summary: Mapping[str, Any], title: str) -> str:
    """One row per protocol: closed accuracy, open recall (and strict's F1 and exact match), counts."""
    lines = [
        f"# {title}",
        "",
        f"{summary['n_closed']} closed and {summary['n_open']} open questions; percentages.",
        "",
        "| protocol | " + " | ".join(VQA_COLUMNS.values()) + " |",
        "|---|" + "---:|" * len(VQA_COLUMNS),
    ]
    for protocol, numbers in summary["by_protocol"].items():
        lines.append(f"| {protocol} | " + " | ".join(_cell(numbers.get(k)) for k in VQA_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def chat_markdown(summary: Mapping[str, Any], title: str) -> str:
    groups = summary["groups"]
    lines = [
        f"# {title}",
        "",
        f"Judge: `{summary['judge_model']}`"
        + (
            f" (served as {', '.join(f'`{m}`' for m in summary['judge_served_models'])})"
            if summary["judge_served_models"]
            else ""
        )
        + f", temperature {summary['judge_temperature']}; {summary['judged']} of {summary['questions']} questions"
        f" judged in both orders; position bias {_cell(summary['position_bias'])} points for the answer shown"
        " first.",
        "",
        "| group | n | reference (1-10) | model (1-10) | relative score | ratio of means | reference first only |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, g in groups.items():
        lines.append(
            f"| {name} | {g['n']} | {_cell(g['reference_score'])} | {_cell(g['model_score'])} | "
            f"{_cell(g['relative_score'])} | {_cell(g['ratio_of_means'])} | "
            f"{_cell(g['relative_score_reference_first'])} |"
        )
    return "\n".join(lines) + "\n"


def _bar_chart(
    labels: list[str], series: Mapping[str, list[float | None]], ylabel: str, title: str, out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) * max(1, len(series)) / 2 + 2), 3.6))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    staging = out.with_name(out.name + ".tmp.png")
    fig.savefig(staging, dpi=120)
    plt.close(fig)
    os.replace(staging, out)


def write_vqa(summary: Mapping[str, Any], stem: str | os.PathLike[str], title: str) -> tuple[Path, Path]:
    """``{stem}.md`` and ``{stem}.png``."""
    stem = Path(stem)
    md, png = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".png")
    write_atomic(md, vqa_markdown(summary, title))
    labels = list(summary["by_protocol"])
    series = {
        label: [summary["by_protocol"][p].get(key) for p in labels]
        for key, label in VQA_COLUMNS.items()
        if any(summary["by_protocol"][p].get(key) is not None for p in labels)
    }
    _bar_chart(labels, series, "%", title, png)
    return md, png


def write_chat(summary: Mapping[str, Any], stem: str | os.PathLike[str], title: str) -> tuple[Path, Path]:
    stem = Path(stem)
    md, png = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".png")
    write_atomic(md, chat_markdown(summary, title))
    groups = {k: g for k, g in summary["groups"].items() if g["n"]}
    series = {
        "relative score": [g["relative_score"] for g in groups.values()],
        "ratio of means": [g["ratio_of_means"] for g in groups.values()],
    }
    _bar_chart(list(groups), series, "% of the reference", title, png)
    return md, png
