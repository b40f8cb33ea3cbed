"""The README quickstart runs from an empty folder outside the repository (no `benchmarks` import, no network)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import hf_fwsvd

REPO_ROOT = Path(__file__).resolve().parents[1]
SRC = Path(hf_fwsvd.__file__).resolve().parents[1]


def _quickstart() -> tuple[str, list[str]]:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Quickstart") : readme.index("## Works with")]
    code, output = re.findall(r"```(?:python)?\n(.*?)```", section, flags=re.S)[:2]
    return code, output.strip().splitlines()


def test_readme_quickstart_is_short_and_runs_outside_the_repository(tmp_path):
    code, expected = _quickstart()
    assert len(code.strip().splitlines()) <= 10
    ast.parse(code)
    assert "benchmarks" not in code
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    env |= {"OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.strip().splitlines()
    assert printed[0] == expected[0]
    label, score = re.fullmatch(r"\[\{'label': '(\w+)', 'score': ([0-9.]+)\}\]", printed[1]).groups()
    expected_label, expected_score = re.fullmatch(
        r"\[\{'label': '(\w+)', 'score': ([0-9.]+)\}\]", expected[1]
    ).groups()
    assert label == expected_label and abs(float(score) - float(expected_score)) < 0.01
    saved = {path.name for path in (tmp_path / "demo-bert-fwsvd").iterdir()}
    assert {"model.fwsvd.safetensors", "tokenizer.json", "README.md", "fwsvd_report.json"} <= saved
