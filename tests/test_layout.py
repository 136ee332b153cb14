"""The rooms of the code, what may import what, and how large a file or class may grow.

From the bottom up: ``official/`` (model, LARS, schedules, BatchNorm — knows
nothing of adversaries) and ``input_pipeline/`` (tf.data); ``flags/``
(definitions and validation); ``conadv/run/`` (the machinery around a run);
the top of ``conadv/`` (the method alone: attack, ring buffer, steps, loop,
evaluation, the run's configuration, the Keras face); ``conadv/keras_fit/``
(what the Keras face is made of); ``conadv/studies/`` (the tooling, and the
programs ``setup.py`` installs as console scripts beside ``conadv-train``). A room
imports only from itself and the rooms below it, and no module imports
itself back through others.

Catches: ``official/`` importing the method, the flags importing the method
(``flags/benchmark.py`` once took its choices from ``conadv.steps``), the run
machinery importing the method, the method importing its tooling, a program
at the top of ``conadv/``, a console script naming no function, an import
cycle, a file or class grown past a screenful a reader can hold.
"""

import ast
import glob
import os
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = ("conadv", "official", "input_pipeline", "flags")

#: Lines per file in conadv/ and official/, and per class (about 400 and 250).
FILE_LIMIT = 410
CLASS_LIMIT = 260

#: The top of conadv/: the method alone (its programs live in conadv/studies/).
METHOD_FILES = {
    "attack.py",
    "ring_buffer.py",
    "step_context.py",
    "objective.py",
    "steps.py",
    "free_attack.py",
    "trainer.py",
    "evaluation.py",
    "run_config.py",
    "keras.py",
}


def module_name(path: str) -> str:
    relative = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return relative[: -len(".__init__")] if relative.endswith(".__init__") else relative


def imported_modules(path: str) -> set[str]:
    """Every project module a file imports, at any depth (lazy imports included), each
    named by the module itself (``from conadv import steps`` is ``conadv.steps``)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                as_file = os.path.join(ROOT, *candidate.split(".")) + ".py"
                as_package = os.path.join(ROOT, *candidate.split("."), "__init__.py")
                exists = os.path.exists(as_file) or os.path.exists(as_package)
                names.add(candidate if exists else node.module)
    return {n for n in names if n.split(".")[0] in PROJECT}


def project_files():
    paths = []
    for top in PROJECT:
        paths += glob.glob(os.path.join(ROOT, top, "**", "*.py"), recursive=True)
    return sorted(paths)


def room(module: str) -> tuple[int, str]:
    """(height, name) of the room a module lives in."""
    parts = module.split(".")
    if parts[0] in ("official", "input_pipeline"):
        return 0, parts[0]
    if parts[0] == "flags":
        return 1, "flags"
    if parts[:2] == ["conadv", "run"]:
        return 2, "conadv.run"
    if parts[:2] == ["conadv", "keras_fit"]:
        return 4, "conadv.keras_fit"
    if parts[:2] == ["conadv", "studies"]:
        return 5, "conadv.studies"
    return 3, "conadv"


def allowed(importer: str, imported: str) -> bool:
    (height, name), (other_height, other_name) = room(importer), room(imported)
    if name == other_name:
        return True
    if name in ("official", "input_pipeline"):
        # The two bottom rooms: input_pipeline may use official, never the reverse.
        return name == "input_pipeline" and other_name == "official"
    if importer == "conadv.keras":
        return True  # the Keras face names what it exposes
    return other_height < height


class LayerTest(unittest.TestCase):
    def test_no_room_imports_from_a_room_above_it(self):
        found = []
        for path in project_files():
            importer = module_name(path)
            for imported in sorted(imported_modules(path)):
                if not allowed(importer, imported):
                    found.append(f"{importer} ({room(importer)[1]}) imports {imported}")
        self.assertEqual(found, [])

    def test_no_import_cycle(self):
        graph = {module_name(p): imported_modules(p) for p in project_files()}
        cycles = []

        def visit(node, path, on_path, done):
            on_path.add(node)
            path.append(node)
            for nxt in sorted(graph.get(node, ())):
                if nxt in on_path:
                    cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
                elif nxt not in done:
                    visit(nxt, path, on_path, done)
            path.pop()
            on_path.discard(node)
            done.add(node)

        done = set()
        for node in sorted(graph):
            if node not in done:
                visit(node, [], set(), done)
        # A package's __init__ importing its own modules is not a cycle.
        cycles = [c for c in cycles if len(set(c.split(" -> "))) > 1]
        self.assertEqual(cycles, [])

    def test_the_top_of_conadv_is_the_method(self):
        top = {
            os.path.basename(p)
            for p in glob.glob(os.path.join(ROOT, "conadv", "*.py"))
            if not p.endswith("__init__.py")
        }
        self.assertEqual(top, METHOD_FILES)

    def test_the_console_scripts_name_functions(self):
        with open(os.path.join(ROOT, "setup.py")) as f:
            tree = ast.parse(f.read())
        scripts = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "console_scripts":
                        scripts.update(s.split("=") for s in ast.literal_eval(value))
        self.assertEqual(
            set(scripts),
            {"conadv-train", "conadv-benchmark", "conadv-experiments", "conadv-bn-study"},
        )
        # Read, not imported: the programs define absl flags, and one process (a pytest
        # worker) cannot define the flags of main.py and of the input benchmark both.
        for script, target in scripts.items():
            module, function = target.split(":")
            path = os.path.join(ROOT, *module.split(".")) + ".py"
            self.assertTrue(os.path.exists(path), script)
            with open(path) as f:
                defined = {
                    node.name
                    for node in ast.parse(f.read()).body
                    if isinstance(node, ast.FunctionDef)
                }
            self.assertIn(function, defined, script)

    def test_files_and_classes_stay_readable(self):
        too_long = []
        for top in ("conadv", "official"):
            for path in glob.glob(os.path.join(ROOT, top, "**", "*.py"), recursive=True):
                with open(path) as f:
                    text = f.read()
                lines = len(text.splitlines())
                name = os.path.relpath(path, ROOT)
                if lines > FILE_LIMIT:
                    too_long.append(f"{name}: {lines} lines")
                for node in ast.parse(text).body:
                    if isinstance(node, ast.ClassDef):
                        size = node.end_lineno - node.lineno + 1
                        if size > CLASS_LIMIT:
                            too_long.append(f"{name}: class {node.name}, {size} lines")
        self.assertEqual(too_long, [])

    def test_the_flags_name_the_methods_the_steps_implement(self):
        from conadv import steps
        from flags import method

        self.assertEqual(method.METHODS, steps.METHODS)
        self.assertEqual(method.UPDATE_PASSES, steps.UPDATE_PASSES)


if __name__ == "__main__":
    unittest.main()
