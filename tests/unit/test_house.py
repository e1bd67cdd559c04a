"""House rules that keep the code walkable: import direction and size limits."""

import ast
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(REPO, "locmoe_train")

# Modules that define a router, a dispatcher, the MoE layer, an MoE runtime, or that
# choose between them; the config must describe their options without importing them.
IMPLEMENTATIONS = [
    "locmoe_train.moe.impls",  # NativeImpl / MegatronImpl, MegatronMoERuntime
    "locmoe_train.moe.layer",  # MoELayer
    "locmoe_train.moe.runtime",  # MoERuntime
    "locmoe_train.moe.routers",  # the router registry
    "locmoe_train.moe.routers.base",
    "locmoe_train.moe.routers.topk",
    "locmoe_train.moe.routers.locmoe_plus",
    "locmoe_train.moe.dispatcher",  # alltoall dispatcher and the registry
    "locmoe_train.moe.hierarchical",  # the locality-aware dispatcher
    "locmoe_train.moe.capacity",  # the capacity controller (it imports the config)
    "locmoe_train.moe.experts",
]
MAX_FILE_LINES, MAX_FUNCTION_LINES = 450, 80


def _modules_after(code: str) -> set:
    """The modules a fresh interpreter holds after running ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        cwd=REPO, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": REPO})
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_the_config_imports_no_implementation():
    loaded = _modules_after(
        "import locmoe_train.config\n"
        "from locmoe_train.config import load_config\n"
        "load_config('configs/quickstart.yaml', ['moe.router=topk', 'parallel.ep=2'])\n"
        "import locmoe_train.config_help\n"
        "locmoe_train.config_help.help_text()")
    assert "locmoe_train.config" in loaded and "locmoe_train.config_help" in loaded
    assert not loaded & set(IMPLEMENTATIONS), sorted(loaded & set(IMPLEMENTATIONS))
    assert "torch" not in loaded and "megatron" not in loaded
    # The names above are real modules: building a model does import them.
    assert set(IMPLEMENTATIONS) <= _modules_after(
        "from locmoe_train.moe.impls import check_impl\n"
        "from locmoe_train.config import load_config\n"
        "import locmoe_train.moe.layer, locmoe_train.moe.runtime, locmoe_train.moe.experts\n"
        "import locmoe_train.moe.capacity\n"
        "check_impl(load_config(None, ['moe.dispatcher=hierarchical']))")


def _python_files():
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(root, name)


def test_no_file_over_450_lines_and_no_function_over_80():
    too_long = []
    for path in _python_files():
        with open(path) as f:
            source = f.read()
        rel = os.path.relpath(path, REPO)
        lines = len(source.splitlines())
        if lines > MAX_FILE_LINES:
            too_long.append(f"{rel}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "over the house limits (450 lines a file, 80 a function):\n" + \
        "\n".join(too_long)
