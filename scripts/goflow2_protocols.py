#!/usr/bin/env python3
"""Regenerate trainer/anomalyd_trainer/goflow2_protocols.json, the protocol names goflow2 prints.

goflow2 renders a flow's `proto` with `ProtoName` (producer/proto/render.go): a name from its IANA
table, or one name shared by a whole range of numbers ("unassigned", "experimental", ...). Rather
than parse that Go code, this script runs it: it builds a tiny Go program against goflow2 at the
pinned version (Go and the Go module proxy needed) that prints `ProtoName(n)` for n = 0..257 (256
and 257 stand for every number above 255, which all print alike), and writes the name → number
table that the daemon (src/flows.rs) and the trainer (anomalyd_trainer/flows.py) both read:

- a name printed for exactly one number maps to that number;
- a name printed for several numbers maps to null ("other": the number cannot be recovered);
- names that older goflow2 (before v2.2.0) printed and the current table lacks: "ICMPv6" for 58
  and "" for every protocol it did not name.

Run: python3 scripts/goflow2_protocols.py [--go /usr/local/go/bin/go] (standard library only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

MODULE = "github.com/netsampler/goflow2/v2"
VERSION = "v2.2.6"
OUT = Path(__file__).resolve().parents[1] / "trainer" / "anomalyd_trainer" / "goflow2_protocols.json"
OLDER_NAMES = {"ICMPv6": 58, "": None}

PROGRAM = """package main

import (
\t"fmt"

\tprotoproducer "github.com/netsampler/goflow2/v2/producer/proto"
)

func main() {
\tfor n := uint32(0); n <= 257; n++ {
\t\tfmt.Printf("%d\\t%s\\n", n, protoproducer.ProtoName(n))
\t}
}
"""


def printed_names(go: str) -> list[str]:
    """ProtoName(n) for n = 0..257, from goflow2's own code."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "main.go").write_text(PROGRAM)
        env = {**os.environ, "GOFLAGS": "-mod=mod"}
        subprocess.run([go, "mod", "init", "protonames"], cwd=tmp, env=env, check=True, capture_output=True)
        subprocess.run([go, "get", f"{MODULE}@{VERSION}"], cwd=tmp, env=env, check=True, capture_output=True)
        out = subprocess.run([go, "run", "."], cwd=tmp, env=env, check=True, capture_output=True, text=True).stdout
    rows = [line.split("\t", 1) for line in out.splitlines()]
    assert [int(n) for n, _ in rows] == list(range(258)), "one line per number 0..257"
    return [name for _, name in rows]


def table(printed: list[str]) -> dict[str, int | None]:
    numbers: dict[str, list[int]] = defaultdict(list)
    for n, name in enumerate(printed):
        numbers[name].append(n)
    names = {name: ns[0] if len(ns) == 1 else None for name, ns in numbers.items()}
    clash = names.keys() & OLDER_NAMES.keys()
    assert not clash, f"older goflow2 names now in the table: {clash}"
    return {**names, **OLDER_NAMES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--go", default=shutil.which("go") or "/usr/local/go/bin/go", help="the Go command")
    args = parser.parse_args()
    document = {
        "goflow2_version": VERSION,
        "source": f"goflow2 {VERSION} ({MODULE}), producer/proto/render.go: ProtoName(n) for n = 0..257",
        "generated_by": "scripts/goflow2_protocols.py",
        "meaning": "name -> protocol number; null: a name goflow2 prints for several numbers (other)",
        "older_goflow2": "names printed before v2.2.0 and kept: " + ", ".join(map(json.dumps, OLDER_NAMES)),
        "names": table(printed_names(args.go)),
    }
    OUT.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(document['names'])} names")


if __name__ == "__main__":
    main()
