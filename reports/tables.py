"""A report table (row groups, bold cells, notes) and its three renderings: Markdown, LaTeX
(booktabs) and HTML. The builders in `reports.content` fill it; nothing here knows what a cell means."""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field


@dataclass
class Row:
    cells: list[str]
    bold: set[int] = field(default_factory=set)  # column indices printed in bold
    muted: bool = False  # a control or a published value: shown in grey / italics


@dataclass
class Table:
    title: str
    columns: list[str]
    groups: list[tuple[str, list[Row]]]  # (heading, rows); an empty heading prints no heading row
    caption: str = ""
    notes: list[str] = field(default_factory=list)
    key: str = ""  # a short id (file names, anchors)

    def rows(self) -> list[Row]:
        return [r for _, rows in self.groups for r in rows]


# ---- Markdown --------------------------------------------------------------------------------
def _md_cell(text: str, bold: bool) -> str:
    text = text.replace("|", "\\|")
    return f"**{text}**" if bold and text else text


def markdown(t: Table) -> str:
    n = len(t.columns)
    lines = [f"### {t.title}", ""]
    if t.caption:
        lines += [t.caption, ""]
    lines += ["| " + " | ".join(_md_cell(c, False) for c in t.columns) + " |",
              "|" + "|".join([":---"] + ["---:"] * (n - 1)) + "|"]
    for heading, rows in t.groups:
        if heading:
            lines.append("| *" + _md_cell(heading, False) + "*" + " |" * n)
        for r in rows:
            cells = [_md_cell(c, i in r.bold) for i, c in enumerate(r.cells)]
            if r.muted and cells[0]:
                cells[0] = f"*{cells[0]}*"
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {note}" for note in t.notes]
    return "\n".join(lines) + ("\n" if t.notes else "")


# ---- LaTeX -----------------------------------------------------------------------------------
_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_TEX_UNICODE = {"↓": r"$\downarrow$", "×": r"$\times$", "±": r"$\pm$", "−": r"$-$", "–": "--", "Δ": r"$\Delta$",
                "δ": r"$\delta$", "θ": r"$\theta$", "τ": r"$\tau$", "†": r"$^\dagger$", "‡": r"$^\ddagger$",
                "—": "---", "≥": r"$\geq$", "≤": r"$\leq$", "…": r"\ldots{}", "→": r"$\rightarrow$", "·": r"$\cdot$"}


def tex_escape(text: str) -> str:
    """Plain text as LaTeX: its special characters escaped, the few non-ASCII signs the tables use
    as math; any other non-ASCII character is replaced by '?' (a table must compile with pdflatex)."""
    out = "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)
    out = "".join(_TEX_UNICODE.get(ch, ch if ord(ch) < 128 else "?") for ch in out)
    return out


def latex(t: Table) -> str:
    n = len(t.columns)
    body = [r"\begin{table}[t]", r"\centering", r"\small",
            rf"\caption{{{tex_escape(t.title + ('. ' + t.caption if t.caption else ''))}}}",
            rf"\label{{tab:{re.sub(r'[^a-z0-9]+', '-', (t.key or t.title).lower()).strip('-')}}}",
            r"\begin{tabular}{l" + "r" * (n - 1) + "}", r"\toprule",
            " & ".join(tex_escape(c) for c in t.columns) + r" \\", r"\midrule"]
    for g, (heading, rows) in enumerate(t.groups):
        if g:
            body.append(r"\midrule")
        if heading:
            body.append(rf"\multicolumn{{{n}}}{{l}}{{\textit{{{tex_escape(heading)}}}}} \\")
        for r in rows:
            cells = []
            for i, c in enumerate(r.cells):
                c = tex_escape(c)
                if i in r.bold and c:
                    c = rf"\textbf{{{c}}}"
                elif r.muted and i == 0 and c:
                    c = rf"\textit{{{c}}}"
                cells.append(c)
            body.append(" & ".join(cells) + r" \\")
    body += [r"\bottomrule", r"\end{tabular}"]
    if t.notes:
        body += [r"\par\smallskip", r"\begin{minipage}{\linewidth}\footnotesize"]
        body += [tex_escape(note) + r"\par" for note in t.notes]
        body.append(r"\end{minipage}")
    body.append(r"\end{table}")
    return "\n".join(body) + "\n"


def latex_document(tables: list[Table]) -> str:
    """Every table in one file; \\input-able after the preamble it names (booktabs)."""
    head = ("% tables of a twigbench report; needs \\usepackage{booktabs} in the preamble\n"
            "% (compile alone: wrap in \\documentclass{article}\\usepackage{booktabs}\\begin{document} ... "
            "\\end{document})\n\n")
    return head + "\n".join(latex(t) for t in tables)


# ---- HTML ------------------------------------------------------------------------------------
def html_table(t: Table) -> str:
    n = len(t.columns)
    e = html.escape
    out = [f'<section id="{e(t.key)}"><h3>{e(t.title)}</h3>']
    if t.caption:
        out.append(f'<p class="caption">{e(t.caption)}</p>')
    out.append("<table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in t.columns) + "</tr></thead><tbody>")
    for heading, rows in t.groups:
        if heading:
            out.append(f'<tr class="group"><td colspan="{n}">{e(heading)}</td></tr>')
        for r in rows:
            cells = "".join(f"<td>{'<b>' + e(c) + '</b>' if i in r.bold and c else e(c)}</td>"
                            for i, c in enumerate(r.cells))
            out.append(f'<tr{" class=muted" if r.muted else ""}>{cells}</tr>')
    out.append("</tbody></table>")
    if t.notes:
        out.append("<ul class=notes>" + "".join(f"<li>{e(note)}</li>" for note in t.notes) + "</ul>")
    out.append("</section>")
    return "\n".join(out)
