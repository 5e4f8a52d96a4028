"""Slice labels without masks: on which axial slices of a case the organ is, from CSV rows.

A CSV file with a header; each row is one of two kinds (a header `case,first,last,slice,present`
mixes both, each row filling one pair):
- a range `case,first,last`: the organ is on slices first to last (both included) and, outside
  the case's ranges, on no other slice of the case;
- a single slice `case,slice,present`, present 0 or 1.

Slices are numbered as the slice cache and `sammix predict` number them: 0 is the most inferior.
A slice that touches the organ by a single voxel counts as present. Between two slices known to
hold the organ, a slice nothing else labels counts as present too (the organ's z-extent).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from sammix.errors import InputError

RANGE, SINGLE = ("first", "last"), ("slice", "present")


@dataclass(frozen=True)
class SliceRow:
    path: Path
    line: int  # line in the file (the header is line 1)
    case: str
    first: int
    last: int
    present: bool | None  # None: a range

    def error(self, problem: str) -> InputError:
        return InputError(self.path, f"row {self.line}: {problem}")

    def __str__(self) -> str:
        return f"{self.path.name} row {self.line}"


def _row(path: Path, line: int, record: dict) -> SliceRow:
    values = {k: (record.get(k) or "").strip() for k in ("case", *RANGE, *SINGLE)}
    kinds = [names for names in (RANGE, SINGLE) if any(values[n] for n in names)]
    if not values["case"] or len(kinds) != 1 or not all(values[n] for n in kinds[0]):
        empty = [n for n in kinds[0] if not values[n]] if values["case"] and len(kinds) == 1 else []
        raise InputError(path, f"row {line}: expected case,first,last or case,slice,present"
                               + (f" ({empty[0]} is empty)" if empty else ""))
    try:
        a, b = (int(values[n]) for n in kinds[0])
    except ValueError:
        raise InputError(path, f"row {line}: {','.join(kinds[0])} must be whole numbers, got "
                               f"{','.join(values[n] for n in kinds[0])}") from None
    if a < 0:
        raise InputError(path, f"row {line}: slice {a} is outside the volume (slices start at 0)")
    if kinds[0] == SINGLE:
        if b not in (0, 1):
            raise InputError(path, f"row {line}: present must be 0 or 1, got {b}")
        return SliceRow(path, line, values["case"], a, a, bool(b))
    if a > b:
        raise InputError(path, f"row {line}: first slice {a} is after last slice {b}")
    return SliceRow(path, line, values["case"], a, b, None)


def read_slice_rows(path) -> list[SliceRow]:
    """The rows of a slice-label CSV; bad rows raise a one-line InputError naming the row."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # a spreadsheet's BOM is no column name
            reader = csv.DictReader(fh)
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or ()]
            columns = set(reader.fieldnames)
            if "case" not in columns or not (set(RANGE) <= columns or set(SINGLE) <= columns):
                raise InputError(path, "expected a header line: case,first,last or case,slice,present")
            return [_row(path, reader.line_num, record) for record in reader]
    except OSError as exc:
        raise InputError(path, f"cannot read slice labels ({exc.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable CSV file ({exc})") from None


class CaseSlices:
    """What is known of one case's axial slices: z -> organ present, and which row said so (None:
    the case's label volume). `slices`: those the data holds; `depth`: the volume's slice count
    (None where unknown, as for 2D slice folders)."""

    def __init__(self, name: str, slices, depth: int | None):
        self.name, self.slices, self.depth = name, sorted(slices), depth
        self.present: dict[int, bool] = {}
        self.said: dict[int, SliceRow | None] = {}
        self.looked_empty: set[int] = set()  # slices a looked-at row found organ-free

    def set(self, z: int, present: bool, row: SliceRow | None = None) -> None:
        if self.present.get(z, present) != present:
            word = {True: "present", False: "absent"}
            raise row.error(f"says the organ is {word[present]} on slice {z} of case {self.name}, but "
                            f"{self.said[z] or 'its label volume'} says {word[not present]}")
        self.present.setdefault(z, present)
        self.said.setdefault(z, row)


def _case_of(row: SliceRow, by_name: dict[str, list[CaseSlices]]) -> CaseSlices:
    found = by_name.get(row.case, [])
    if not found:
        raise row.error(f"case {row.case!r} is not in the data")
    if len(found) > 1:
        raise row.error(f"case {row.case!r} is in several datasets ({', '.join(c.name for c in found)})")
    case = found[0]
    if case.depth is not None and row.last >= case.depth:
        raise row.error(f"slice {row.last} is outside case {row.case} (slices 0 to {case.depth - 1})")
    return case


def label_cases(cases: list[CaseSlices], rows: list[SliceRow], looked_at: list[SliceRow] = ()) -> None:
    """Apply the rows to the cases: single slices, then ranges, then each case's z-extent.
    `looked_at` rows count as rows too, and the organ-free slices they name go to `looked_empty`.
    A row may name a case by its name in the data or, when several datasets are joined
    ("<folder>/<case>"), by the case alone."""
    by_name: dict[str, list[CaseSlices]] = {}
    for case in cases:
        for name in {case.name, case.name.rpartition("/")[2]}:
            by_name.setdefault(name, []).append(case)
    ranges: dict[CaseSlices, list[SliceRow]] = {}
    looked = set(looked_at)
    for row in [*rows, *looked_at]:
        case = _case_of(row, by_name)
        if row.present is None:
            ranges.setdefault(case, []).append(row)
            continue
        case.set(row.first, row.present, row)
        if row in looked and not row.present:
            case.looked_empty.add(row.first)
    for case, spans in ranges.items():
        spans.sort(key=lambda r: r.first)
        for a, b in zip(spans, spans[1:]):
            if b.first <= a.last:
                raise b.error(f"range {b.first}-{b.last} of case {case.name} crosses {a} ({a.first}-{a.last})")
        for z in sorted({*case.slices, *case.present}):
            inside = [r for r in spans if r.first <= z <= r.last]
            case.set(z, bool(inside), (inside or spans)[0])
    for case in cases:
        organ = sorted(z for z, present in case.present.items() if present)
        for z in case.slices:
            if organ and organ[0] < z < organ[-1]:
                case.present.setdefault(z, True)
