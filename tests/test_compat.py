"""`import hf_fwsvd` refuses a transformers older than the supported floor, with one clear error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hf_fwsvd
from hf_fwsvd.compat import MIN_TRANSFORMERS, TESTED_TRANSFORMERS, check_transformers_version

REPO_ROOT = Path(__file__).resolve().parents[1]
SRC = Path(hf_fwsvd.__file__).resolve().parents[1]


def test_old_transformers_is_refused_at_import_naming_both_versions():
    script = "import transformers\ntransformers.__version__ = '4.57.1'\nimport hf_fwsvd\n"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == (
        f"ImportError: hf_fwsvd needs transformers>={MIN_TRANSFORMERS} (tested with {TESTED_TRANSFORMERS}), but "
        "transformers 4.57.1 is installed: its quantizer hooks differ and compressed checkpoints would fail to save "
        f'or load. Upgrade it with `pip install "transformers>={MIN_TRANSFORMERS}"`.'
    )


@pytest.mark.parametrize("version", ["5.20.0", "5.24.0", "6.0.0.dev0", "5.20.0rc1"])
def test_supported_versions_pass(version):
    check_transformers_version(version)  # 5.20.0rc1 has the 5.20 API: compared on the release numbers


def test_pyproject_floor_is_the_checked_floor():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'"transformers>=([\d.]+)"', pyproject).group(1) == MIN_TRANSFORMERS
