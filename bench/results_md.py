"""Replacing one "## ..." section of bench/RESULTS.md, leaving the others.

Benchmark scripts run at different times and each owns one section; a
"### Notes" subsection written by hand under it is kept across runs.
"""

import os
import tempfile


def splice(results_path, section, header):
    """Puts `section` (starting with the line `header`) in place of the old one."""
    section = section.rstrip("\n") + "\n"
    # Read right before writing: others edit other sections of this file.
    text = open(results_path).read() if os.path.exists(results_path) else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == header), None)
    if start is None:
        body = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        notes_at = next((j for j in range(start + 1, end) if lines[j].startswith("### Notes")), None)
        if notes_at is not None:
            section += "\n" + "".join(lines[notes_at:end]).rstrip("\n") + "\n"
        after = "".join(lines[end:])
        body = "".join(lines[:start]) + section + ("\n" + after if after else "")
    d = os.path.dirname(os.path.abspath(results_path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".results-", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(body)
    os.chmod(tmp, 0o644)
    os.replace(tmp, results_path)
