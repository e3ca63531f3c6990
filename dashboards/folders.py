"""The Grafana folders the dashboards live in, and reading the built JSON back from disk.

No grafana-foundation-sdk here: `kwwk dashboards push` needs only this module, `grafana.py` and httpx.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["BALANCE", "FOLDERS", "JSON_DIR", "OPERATIONS", "load_dir"]

JSON_DIR = Path(__file__).resolve().parent / "json"
BALANCE, OPERATIONS = "KWWK Balance", "KWWK Operations"
#: Grafana folder title → folder uid. The title is also the subdirectory of dashboards/json: file provisioning
#: (foldersFromFilesStructure) makes each subdirectory a folder of that name; push creates or finds it by title.
FOLDERS: dict[str, str] = {BALANCE: "kwwk-balance", OPERATIONS: "kwwk-operations"}


def load_dir(directory: Path = JSON_DIR) -> list[tuple[str, dict[str, Any]]]:
    """(folder, dashboard JSON) of every file under the folder directories."""
    out: list[tuple[str, dict[str, Any]]] = []
    for folder in FOLDERS:
        for path in sorted((directory / folder).glob("*.json")):
            out.append((folder, json.loads(path.read_text(encoding="utf-8"))))
    return out
