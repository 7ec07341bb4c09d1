"""`recall.md`: the report's sections (pipeline.report.sections) as Markdown."""

from __future__ import annotations

from pipeline.report.sections import Section, SliceRule, decision, report_sections


def render_markdown(sections: list[Section]) -> str:
    lines: list[str] = []
    for section in sections:
        lines += [f"{'#' * section.level} {section.title}", ""]
        lines += [f"**Warning:** {warning}" for warning in section.warnings]
        lines += [*section.text, ""]
        for table in section.tables:
            lines += ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
            lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in table.rows]
            lines.append("")
        lines += [f"- {bullet}" for bullet in section.bullets]
        lines += [f"![{alt}]({name})" for name, alt in section.figures]
        lines.append("")
    return "\n".join(lines)


def render_report(summary: dict, rule: SliceRule, metric: str, data: dict | None = None) -> str:
    return render_markdown(report_sections(summary, rule, metric, data))


def render_decision(summary: dict) -> str:
    """The promotion decision section alone, as Markdown ("" when the summary holds none)."""
    section = decision(summary)
    return render_markdown([section]) if section else ""
