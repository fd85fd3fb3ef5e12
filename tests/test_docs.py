"""The docs as a reader meets them: tables that render whole, each error code listed once."""

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def tables(text: str) -> list[list[str]]:
    """Each markdown table, as its lines; a blank line ends a table."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found


def test_no_table_is_split_by_a_blank_line():
    for path in DOCS.glob("*.md"):
        for table in tables(path.read_text()):
            # A table's second line is its |---| separator; a split-off tail has none.
            assert len(table) >= 2 and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1]), f"{path.name}: a table without a header: {table[0]}"


def test_each_error_code_is_listed_once():
    text = (DOCS / "configuration.md").read_text()
    errors = text.split("## Errors clients can get", 1)[1]
    table = tables(errors)[0]
    codes = [code for row in table[2:] for code in re.findall(r"`([a-z_]+)`", row.split("|")[2])]
    assert codes and len(codes) == len(set(codes)), sorted(c for c in codes if codes.count(c) > 1)
