"""The tabular modality: a federation-wide schema that turns clinical.csv rows into fixed vectors."""

from __future__ import annotations

import csv
import difflib
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClinicalField:
    name: str
    scale: float = 1.0  # numeric fields are divided by it
    categories: tuple[str, ...] = ()  # categorical fields are one-hot encoded

    @property
    def width(self) -> int:
        return len(self.categories) if self.categories else 1


@dataclass(frozen=True)
class ClinicalSchema:
    fields: tuple[ClinicalField, ...]

    @property
    def width(self) -> int:
        return sum(f.width for f in self.fields)

    def encode(self, row: dict[str, str]) -> tuple[list[float], list[str]]:
        """Row -> vector; unknown or missing values encode as zeros and are returned as problems."""
        vector: list[float] = []
        problems: list[str] = []
        for f in self.fields:
            raw = (row.get(f.name) or "").strip()
            if f.categories:
                hot = [1.0 if raw == c else 0.0 for c in f.categories]
                if raw and not any(hot):
                    problems.append(f"{f.name}={raw!r} is not one of {'|'.join(f.categories)}")
                vector += hot
            else:
                value = _to_float(raw)
                if raw and value is None:
                    problems.append(f"{f.name}={raw!r} is not a finite number")
                vector.append((value or 0.0) / f.scale)
        return vector, problems


def _to_float(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_schema(text: str) -> ClinicalSchema:
    """'age=num:100,sex=cat:F|M' -> schema. An empty string means no clinical modality."""
    fields = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, spec = item.partition("=")
        kind, _, arg = spec.partition(":")
        if kind == "num":
            fields.append(ClinicalField(name, scale=float(arg or 1.0)))
        elif kind == "cat" and arg:
            fields.append(ClinicalField(name, categories=tuple(arg.split("|"))))
        else:
            raise ValueError(f"clinical field {item!r}: expected name=num:SCALE or name=cat:A|B")
    return ClinicalSchema(tuple(fields))


def missing_columns(schema: ClinicalSchema, rows: dict[str, dict[str, str]]) -> list[str]:
    """One line per field of the schema that no row of clinical.csv has as a column (a misspelled or absent
    header): every case would encode it as zeros. Names the closest column when there is one."""
    columns = sorted({c for row in rows.values() for c in row if c is not None})
    lower = {c.lower(): c for c in columns}
    out = []
    for f in schema.fields:
        if f.name not in columns:
            close = [c for c in columns if f.name.lower() in c.lower()] or [
                lower[m] for m in difflib.get_close_matches(f.name.lower(), list(lower), n=1)]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append(f"column {f.name!r} of the clinical contract is missing{hint}; columns: {', '.join(columns)}")
    return out


def read_clinical_csv(path: Path) -> dict[str, dict[str, str]]:
    """case id -> row. The id column is `case_id` (or the first column)."""
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise ValueError("no header row")
        key = "case_id" if "case_id" in reader.fieldnames else reader.fieldnames[0]
        return {row[key].strip(): row for row in reader if row.get(key)}
