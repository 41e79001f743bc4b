"""The package's shape: layers without import cycles, a command line that starts without torch, one flag convention."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vaekit
from vaekit.cli.main import build_parser, main

PACKAGE = Path(vaekit.__file__).parent
ROOT = PACKAGE.parent.parent


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules():
    """{module name: parsed ast} of every module of vaekit."""
    return {module_name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def imported_modules(name, tree, known):
    """The vaekit modules `name` imports anywhere in its file, function bodies included."""
    is_package = (PACKAGE / Path(*name.split(".")[1:]) / "__init__.py").is_file()
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph():
    modules = package_modules()
    graph = {name: imported_modules(name, tree, modules) for name, tree in modules.items()}
    # A package's __init__ re-exporting its own modules is not a dependency of those modules on it.
    return {a: {b for b in bs if not a.startswith(b + ".")} for a, bs in graph.items()}


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle_counting_imports_inside_functions():
    assert find_cycle(import_graph()) is None


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    tree = ast.parse("def f():\n    from vaekit.train import loop\n")
    assert imported_modules("vaekit.model.load", tree, {"vaekit.train", "vaekit.train.loop"}) == {"vaekit.train", "vaekit.train.loop"}


# The layers from the bottom up (docs/architecture.md): a module imports its own layer and the layers below.
LAYERS = (("foundation",), ("model",), ("codec", "data", "pretrained"), ("cache",), ("eval",), ("train",), ("cli",))

# The one import against that order, by design: loading a model reads training checkpoints through
# train.checkpoint, which imports nothing of train itself (checked below).
UPWARD_BY_DESIGN = {("vaekit.model.load", "vaekit.train.checkpoint")}


def layer_rank(module):
    """The position in LAYERS of a vaekit module; the entry point `vaekit.__main__` belongs to the command line."""
    parts = module.split(".")
    group = "cli" if module == "vaekit.__main__" else parts[1] if len(parts) > 1 else "foundation"
    return next((rank for rank, names in enumerate(LAYERS) if group in names), 0)


def upward_imports(graph):
    """'a -> b' for every import of a module from a higher layer, apart from UPWARD_BY_DESIGN."""
    return sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs
                  if layer_rank(b) > layer_rank(a) and (a, b) not in UPWARD_BY_DESIGN)


def test_no_layer_imports_from_a_layer_above_it():
    assert upward_imports(import_graph()) == []


def test_the_layer_check_refuses_evaluation_reaching_into_training():
    graph = {"vaekit.eval.diffusability": {"vaekit.train.regularizers", "vaekit.model.latents"},
             "vaekit.eval.diagnostics": {"vaekit.train.losses"}, "vaekit.train.loop": {"vaekit.eval.metrics"}}
    assert upward_imports(graph) == ["vaekit.eval.diagnostics -> vaekit.train.losses",
                                     "vaekit.eval.diffusability -> vaekit.train.regularizers"]
    tree = ast.parse("def f():\n    from vaekit.train.losses import kl_loss  # late\n")
    known = {"vaekit.train.losses", "vaekit.eval.diagnostics"}
    assert upward_imports({"vaekit.eval.diagnostics": imported_modules("vaekit.eval.diagnostics", tree, known)})


def test_the_checkpoint_reader_that_model_loading_uses_needs_nothing_above_the_model():
    above = {b for b in import_graph()["vaekit.train.checkpoint"] if layer_rank(b) > layer_rank("vaekit.model")}
    assert above == set()


def test_only_the_command_line_imports_the_command_line():
    leaks = [f"{a} -> {b}" for a, bs in import_graph().items() for b in bs
             if b.startswith("vaekit.cli") and not a.startswith("vaekit.cli") and a != "vaekit.__main__"]
    assert leaks == []


def test_imports_inside_functions_give_their_reason():
    """A function-level import (a heavy or optional dependency, loaded late) carries a comment saying why."""
    missing = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            imports = [n for n in ast.walk(func) if isinstance(n, (ast.Import, ast.ImportFrom))]
            blocks = []  # runs of consecutive import lines (blank lines included)
            for node in sorted(imports, key=lambda n: n.lineno):
                if blocks and node.lineno - blocks[-1][-1].end_lineno <= 2:
                    blocks[-1].append(node)
                else:
                    blocks.append([node])
            for block in blocks:
                span = lines[block[0].lineno - 2: block[-1].end_lineno]  # the line above the block, and the block
                if not any("#" in line for line in span):
                    missing.append(f"{path.relative_to(ROOT)}:{block[0].lineno}")
    assert missing == []


@pytest.mark.parametrize("package", ["vaekit.model", "vaekit.codec", "vaekit.data", "vaekit.cache", "vaekit.train",
                                     "vaekit.eval", "vaekit.pretrained"])
def test_every_name_a_package_exports_resolves(package):
    module = importlib.import_module(package)
    for name in dir(module):
        if not name.startswith("_"):
            assert getattr(module, name) is not None


def command_parsers(parser=None, prefix="vaekit"):
    """(name, parser) of every command and subcommand."""
    parser = parser or build_parser()
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from command_parsers(sub, f"{prefix} {name}")


def test_every_command_has_a_description_and_every_option_help_text():
    commands = list(command_parsers())
    assert {"vaekit train", "vaekit encode", "vaekit evaluate", "vaekit weights fetch"} <= {n for n, _ in commands}
    for name, parser in commands:
        assert parser.description, f"{name} has no description"
        for action in parser._actions:
            if action.dest not in ("help",) and not action.help:
                raise AssertionError(f"{name} {action.option_strings or action.dest} has no help text")


def test_every_snake_case_option_also_answers_to_its_dashed_spelling():
    for name, parser in command_parsers():
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and "_" in option:
                    assert option.replace("_", "-") in action.option_strings, f"{name} {option}"
                if option.startswith("--") and "-" in option[2:] and not option.startswith("--no-"):
                    assert option.replace("-", "_").replace("__", "--", 1) in action.option_strings, f"{name} {option}"
    args = build_parser().parse_args(["encode", "--batch-size", "3", "--num_workers", "1"])
    assert (args.batch_size, args.num_workers) == (3, 1)


def test_an_unknown_option_prints_the_subcommand_usage_and_the_closest_option(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["encode", "--vae", "preset:tiny", "--bach_size", "3"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: vaekit encode")
    assert "unrecognized arguments: --bach_size" in err and "did you mean --batch_size?" in err


def test_a_mistyped_command_suggests_the_closest_one(capsys):
    with pytest.raises(SystemExit):
        main(["evalute"])
    assert "did you mean evaluate?" in capsys.readouterr().err


CLI_PROBE = """
import sys
from vaekit.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "diffusers", "torchmetrics", "accelerate", "lpips") if m in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.parametrize("argv", [["--help"], ["encode", "--help"], ["weights", "fetch", "--help"],
                                  ["train", "--bad-flag"], ["evaluate", "--resolution", "huge"]])
def test_parsing_the_command_line_loads_no_torch(argv):
    result = subprocess.run([sys.executable, "-c", CLI_PROBE, *argv], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


def test_entry_points_run():
    for argv in (["-m", "vaekit", "--version"], ["-m", "vaekit.cli", "--version"]):
        result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.strip() == f"vaekit {vaekit.__version__}", result.stderr
    script = Path(sys.executable).parent / "vaekit"
    if script.exists():  # installed as a console script (make install)
        result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "encode" in result.stdout


def test_code_and_tests_speak_of_behaviour_not_of_the_process():
    pattern = re.compile(r"\b(issue|acceptance)\s+\d+|STYLE\.md", re.IGNORECASE)
    found = []
    for folder in ("src", "tests", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and path.name != Path(__file__).name:
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []
