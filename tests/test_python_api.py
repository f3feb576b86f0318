"""README.md's "Use from Python" snippet runs as written against the bundled demo model and prints one answer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_snippet(readme: str, section: str = "Use from Python") -> str:
    """The first ```python block under ``## <section>`` (before the next ``## `` heading)."""
    found = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", readme, re.MULTILINE | re.DOTALL)
    assert found, f"README.md has no '## {section}' section"
    block = re.search(r"^```python\n(.*?)^```", found.group(1), re.MULTILINE | re.DOTALL)
    assert block, f"README.md's '## {section}' section has no ```python block"
    return block.group(1)


def test_snippet_extraction_takes_the_sections_first_python_block():
    readme = "## A\n```python\nwrong\n```\n## Use from Python\ntext\n```bash\nno\n```\n```python\nright\n```\n" \
             "```python\nlater\n```\n## B\n"
    assert python_snippet(readme) == "right\n"


def test_readme_python_snippet_prints_the_demo_answer_on_one_line():
    snippet = python_snippet((ROOT / "README.md").read_text(encoding="utf-8"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    # The demo reads examples/panel.jpg's asset code as BR-0131 (README.md, docs/demo-model.md).
    assert len(lines) == 1 and "BR-0131" in lines[0], result.stdout
