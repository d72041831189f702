"""The ES core is pure torch: importing it must not load transformers, trl, peft, accelerate or datasets."""

import ast
import pathlib
import subprocess
import sys

import trl_es.core


FORBIDDEN = ("transformers", "trl", "peft", "accelerate", "datasets")


def test_importing_core_loads_no_hf_library():
    code = (
        "import sys, trl_es.core\n"
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"trl_es.core pulled in: {out.stdout.strip()}"


def test_core_sources_import_no_hf_library():
    for path in pathlib.Path(trl_es.core.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
