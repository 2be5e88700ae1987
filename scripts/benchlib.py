"""What the benchmark scripts share: fio's JSON report and aligned text tables."""
import json


def fio_report(text):
    """fio's ``--output-format=json`` report as a dict; the nbd engine prints a line before it."""
    return json.loads(text[text.index("{"):])


def format_table(header, rows):
    """Columns padded to their widest cell (first left-aligned, the rest right), a rule under the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row):
        return "  ".join(str(v).rjust(w) if i else str(v).ljust(w)
                         for i, (v, w) in enumerate(zip(row, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
