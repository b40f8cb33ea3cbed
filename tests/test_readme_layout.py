"""The README's layout table of `src/hf_fwsvd/` names every module and sub-package, and nothing that is gone."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "hf_fwsvd"


def layout_table_names() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("Layout of `src/hf_fwsvd/`", 1)[1].split("\n\n", 2)[1]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| ")]
    return set(re.findall(r"`([\w/]+(?:\.py)?)`", "".join(first_cells)))


def package_entries() -> set[str]:
    modules = {path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py"}
    packages = {f"{path.name}/" for path in PACKAGE.iterdir() if path.is_dir() and not path.name.startswith("__")}
    return modules | packages


def test_readme_layout_table_lists_every_module_of_the_package():
    listed, present = layout_table_names(), package_entries()
    assert sorted(present - listed) == [], "modules missing from the README's layout table"
    assert sorted(listed - present) == [], "the README's layout table names files that do not exist"
