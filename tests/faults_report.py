"""Render the README's "Faults survived" table from the fault suite's results (build/faults.json).

make test                      # (or: pytest -m faults) writes build/faults.json
python -m tests.faults_report  # rewrites the table between the markers in README.md
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"


def table(results: list[dict[str, object]]) -> str:
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


def main() -> int:
    results = json.loads((ROOT / "build" / "faults.json").read_text())
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print("README.md has no faults markers", file=sys.stderr)
        return 1
    block = f"{BEGIN}\n{table(results)}\n{END}"
    readme.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _m: block, text, flags=re.S))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
