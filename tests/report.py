"""Render the measured tables of docs/ from the suites' results.

make test               # writes build/faults.json (pytest -m faults) and build/security.json
python -m tests.report  # rewrites the tables between their markers in docs/faults.md (and README.md),
                        # docs/security.md

Each table lives between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; a results file that is
missing leaves its table as it was.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def faults_table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| scenario | fault | accounts | lost | duplicates | seconds to recover |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['scenario']} | {r['fault']} | {r['accounts']} | {r['lost']} | {r['duplicates']} "
            f"| {r['seconds_to_recover']} |"
        )
    return "\n".join(rows)


def security_table(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| check | measured |", "|---|---|"]
    for check, values in results.items():
        measured = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in values.items())
        rows.append(f"| {check} | {measured} |")
    return "\n".join(rows)


TABLES = {"faults": faults_table, "security": security_table}
DOCS = {
    "faults": (ROOT / "docs" / "faults.md", ROOT / "README.md"),
    "security": (ROOT / "docs" / "security.md",),
}


def render(text: str, name: str, table: str, where: str = "the document") -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{where} has no {name} markers")
    block = f"{begin}\n{table}\n{end}"
    return re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)


def main() -> int:
    for name, build in TABLES.items():
        results = ROOT / "build" / f"{name}.json"
        if not results.exists():
            print(f"{results} missing: the {name} table is left as it was", file=sys.stderr)
            continue
        table = build(json.loads(results.read_text()))
        for doc in DOCS[name]:
            doc.write_text(render(doc.read_text(), name, table, doc.name))
        print(table, end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
