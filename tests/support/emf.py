"""Reading the CloudWatch embedded-metric-format (EMF) records a process printed.
"""

from __future__ import annotations

import json
from typing import Any


def emf_values(out: str, name: str) -> list[float]:
    """Values of one metric in the EMF records printed to stdout."""
    values: list[float] = []
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "_aws" in record and name in record:
            value = record[name]
            values.extend(value if isinstance(value, list) else [value])
    return values


def emf_records(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"_aws"' in line:
            records.append(json.loads(line))
    return records
