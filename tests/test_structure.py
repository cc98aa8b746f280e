"""The package's structure stays what ARCHITECTURE.md says: imports point one way (front-ends -> engine -> ops ->
backends), there is no import cycle, and the core needs torch alone.

The layer of every module is listed here; a module may import only modules of lower layers. A new module must be
given a layer, so this test also fails on a module nobody placed.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "meancache"

#: Lowest first. Within one layer no module imports another (each layer's modules are independent).
LAYERS = [
    {"_limits", "validation"},  # leaves: constants and the argument checks every layer shares
    # grid checks, output structures, analytic flows, the estimators' host-side weights
    {"sigmas", "outputs", "flows", "estimators"},
    {"hooks"},  # diffusers glue (diffusers imported lazily)
    {"_backend", "reference", "kernels", "_C"},  # the backends behind the ops
    {"ops"},  # the fused steps, one torch.library op each
    {"schedule", "history"},  # data the engine works on
    {"online"},  # the online plan kind
    {"plans", "config"},  # the plan policy and the configuration
    {"engine"},  # the one trajectory engine
    {"sampler", "module", "pipeline"},  # front-ends: thin adapters to the engine
    {"calibration"},  # recording and the search
    {"calibrate"},  # the calibrate front door
    {"api"},  # accelerate / disable / reset / summary
    {"cli", "__init__"},
    # the examples: may use anything above, never used by it
    {"examples"},
]
#: The one upward import allowed, and only inside a function (never when the module loads): `meancache calibrate
#: --model digits` records the embedded example model.
LAZY_ONLY = {("cli", "examples")}
LAYER = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        yield ".".join(rel.parts), path


def _unit(dotted: str) -> str:
    """The layered unit of a module: its top-level name inside the package (a subpackage counts as one)."""
    return dotted.split(".")[0]


def _imports(dotted: str, path: pathlib.Path, *, module_level_only: bool = False) -> set[str]:
    """Top-level names inside meancache that ``path`` imports (absolute or relative); with ``module_level_only``,
    only the imports that run when the module loads (not those inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if module_level_only:
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            fn.body = []
    package_parts = ["meancache", *dotted.split(".")[:-1]] if not path.name == "__init__.py" else [
        "meancache", *dotted.split(".")[:-1]
    ]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
                names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "meancache" and len(parts) > 1:
                found.add(parts[1])
    return found


def _graph(*, module_level_only: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for dotted, path in _modules():
        unit = _unit(dotted) if dotted != "__init__" else "__init__"
        graph.setdefault(unit, set()).update(_imports(dotted, path, module_level_only=module_level_only) - {unit})
    return graph


def test_every_module_has_a_layer():
    missing = sorted(set(_graph()) - set(LAYER))
    assert not missing, f"modules without a layer in tests/test_structure.py: {missing}"


def test_imports_point_down_the_layers():
    wrong = [
        f"{unit} (layer {LAYER[unit]}) imports {dep} (layer {LAYER.get(dep)})"
        for unit, deps in sorted(_graph().items())
        for dep in sorted(deps)
        if unit in LAYER and (dep not in LAYER or LAYER[dep] >= LAYER[unit])
        and not (unit in LAYERS[-1] and dep in LAYERS[-1])  # examples may build on each other
        and (unit, dep) not in LAZY_ONLY
    ]
    assert not wrong, "upward or sideways imports:\n" + "\n".join(wrong)
    loaded = _graph(module_level_only=True)
    eager = [f"{unit} imports {dep} when it loads" for unit, dep in sorted(LAZY_ONLY) if dep in loaded.get(unit, ())]
    assert not eager, "imports allowed only inside functions:\n" + "\n".join(eager)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, dep]))
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_core_needs_torch_alone():
    # numpy, diffusers, transformers, triton, tqdm and matplotlib made unimportable: import meancache and sample
    code = textwrap.dedent(
        """
        import sys
        for name in ("numpy", "diffusers", "transformers", "triton", "tqdm", "matplotlib", "safetensors", "sklearn"):
            sys.modules[name] = None
        import torch, meancache
        x = meancache.sample(lambda x, s: x - 1.0, torch.zeros(2, 3), torch.linspace(1, 0, 11),
                             meancache.Schedule.default(4, 10))
        model = meancache.accelerate(torch.nn.Identity(), budget=2, sigmas=[1.0, 0.5, 0.0], sigma_fn=lambda x: 1.0)
        assert x.shape == (2, 3)
        print("core ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "core ok" in done.stdout, done.stderr[-3000:]
