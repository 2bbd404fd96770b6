"""MMLU's files, read without torch (decontaminate reads the test questions in every data job).

The data is a folder, or a .tar.gz of one, holding `[mmlu/]dev/<subject>_dev.csv` and
`[mmlu/]test/<subject>_test.csv`, each with a header `question,choice0,choice1,choice2,choice3,answer`
and the answer as an index 0-3 (the layout of ../shared/data/eval/mmlu.tar.gz; resources/mmlu/
bundles the dev split and a few subjects' test questions, see its PROVENANCE.md).
"""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path


def read_split(path: str | Path, split: str) -> dict[str, list[dict]]:
    """{subject: [{question, choices, answer}]} of one split ("dev" or "test"), subjects sorted."""
    path = Path(path)
    files: dict[str, str] = {}
    if path.is_dir():
        for f in sorted(path.glob(f"**/{split}/*_{split}.csv")):
            files[f.name] = f.read_text(encoding="utf-8")
    elif path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                name = member.name.rsplit("/", 2)
                if member.isfile() and len(name) >= 2 and name[-2] == split and name[-1].endswith(f"_{split}.csv"):
                    files[name[-1]] = tar.extractfile(member).read().decode("utf-8")
    else:
        raise ValueError(f"{path}: not an MMLU folder or .tar.gz")
    if not files:
        raise ValueError(f"{path}: no {split}/<subject>_{split}.csv files")
    subjects: dict[str, list[dict]] = {}
    for name in sorted(files):
        subject = name.removesuffix(f"_{split}.csv")
        rows = list(csv.reader(io.StringIO(files[name])))
        if rows[0] != ["question", "choice0", "choice1", "choice2", "choice3", "answer"]:
            raise ValueError(f"{path}: {name} has header {rows[0]}, not question,choice0..choice3,answer")
        items = []
        for n, row in enumerate(rows[1:], start=2):
            if len(row) != 6 or row[5] not in ("0", "1", "2", "3"):
                raise ValueError(f"{path}: {name} line {n}: expected 6 fields with an answer 0-3, got {row[:1]}...")
            items.append({"question": row[0], "choices": row[1:5], "answer": int(row[5])})
        subjects[subject] = items
    return subjects
