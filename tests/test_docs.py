"""The dataset guide covers every registry entry (a new YAML without its guide section fails here)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_registry_entry_has_a_section_with_source_layout_and_command():
    text = (REPO / "docs" / "datasets.md").read_text()
    sections = dict(re.findall(r"^### `([a-z0-9_]+)`\n(.*?)(?=^##|\Z)", text, re.MULTILINE | re.DOTALL))
    entries = sorted(p.stem for p in (REPO / "datasets_registry").glob("*.y*ml"))
    missing = [e for e in entries if e not in sections]
    assert not missing, f"docs/datasets.md has no section for {missing}"
    for name in entries:
        body = sections[name]
        assert f"--datasets {name}" in body, f"{name}: no convert command"
        assert "DATA/" in body or "DATA" in body, f"{name}: no layout"
