"""The verdict line at the top of the report: the decision as it stands, rewritten in place.

Evaluate writes the gates' verdict as they read then; promote rewrites the line with the decision
it made (and the replay parity publish measured) every time it decides, a re-decide included, in
recall.md and report.html alike, so the report never shows a stale decision.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from pipeline.errors import StageError

START, END = "<!-- clickclip:verdict -->", "<!-- /clickclip:verdict -->"
BLOCK = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)


def verdict_sentence(verdict: dict) -> str:
    """One line: the decision, who made it, why, and the parity when an index was published."""
    promoted = verdict.get("promoted")
    if verdict.get("by") == "promote":
        head = (f"PROMOTED: version {verdict.get('version')} is champion" if promoted else
                f"CHALLENGER: version {verdict.get('version')} passed the gates and is interleaved with the "
                "champion, which is unchanged until the interleaving gate decides" if verdict.get("challenger") else
                f"NOT PROMOTED: version {verdict.get('version')} was registered, champion unchanged")
    else:
        head = ("the gates say PROMOTE" if promoted else "the gates say DO NOT PROMOTE") + \
            " (evaluate's reading; promote has not decided yet)"
    parts = [head, verdict.get("reason", "")]
    if verdict.get("parity"):
        parts.append(verdict["parity"])
    return " — ".join(p for p in parts if p)


def markdown_block(verdict: dict) -> str:
    return f"{START}\n**Verdict: {verdict_sentence(verdict)}**\n{END}\n\n"


def html_block(verdict: dict) -> str:
    tone = "good" if verdict.get("promoted") else "bad"
    return f'{START}<p class="verdict {tone}"><b>Verdict:</b> {html.escape(verdict_sentence(verdict))}</p>{END}'


def rewrite_verdict(report_dir: Path, verdict: dict) -> list[Path]:
    """Replace the verdict line of recall.md and report.html in `report_dir`; the files rewritten."""
    done = []
    for name, block in (("recall.md", markdown_block(verdict).rstrip("\n")), ("report.html", html_block(verdict))):
        path = report_dir / name
        if path.is_file():
            text = path.read_text()
            if not BLOCK.search(text):
                raise StageError(f"{path} has no verdict line to rewrite (written by an older clickclip): rerun "
                                 "evaluate for this run to write the report anew")
            path.write_text(BLOCK.sub(lambda _, line=block: line, text, count=1))
            done.append(path)
    return done
