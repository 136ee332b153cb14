"""The layers of the code: what may import what.

Catches: ``official/`` importing the method (it knows nothing of adversaries),
``conadv/run/`` importing from ``conadv/`` above it, and ``input_pipeline/``
importing the method.
"""

import ast
import glob
import os
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imported_modules(path: str) -> set[str]:
    """Every absolute module a file imports, at any depth (lazy imports included)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def violations(folder: str, allowed) -> list[str]:
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)):
        for name in sorted(imported_modules(path)):
            top = name.split(".")[0]
            if top in ("conadv", "official", "input_pipeline", "flags") and not allowed(name):
                found.append(f"{os.path.relpath(path, ROOT)} imports {name}")
    return found


class LayerTest(unittest.TestCase):
    def test_official_imports_only_itself(self):
        self.assertEqual(violations("official", lambda n: n.startswith("official")), [])

    def test_run_machinery_imports_nothing_from_the_method_above_it(self):
        def allowed(name):
            return name == "conadv.run" or name.startswith(
                ("conadv.run.", "official", "input_pipeline")
            )

        self.assertEqual(violations("conadv/run", allowed), [])

    def test_input_pipeline_knows_nothing_of_the_method(self):
        def allowed(name):
            return name.startswith(("input_pipeline", "official", "flags"))

        self.assertEqual(violations("input_pipeline", allowed), [])
