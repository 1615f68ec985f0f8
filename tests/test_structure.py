"""The import structure of lctx, read with `ast` (nothing is imported).

Every `import` of an lctx module counts, at module level or inside a function. The
checks: no import cycles between packages or between modules; every import goes to
the same floor or a lower one (table below); imports inside functions only for
optional heavy dependencies.

Floors, lowest first (a package's floor is what it imports today):

  0  lctx.compat, lctx.cli, lctx.data   utilities: import no other lctx package
  1  lctx.parallel, lctx.kernels         import compat only
  2  lctx.model                          kernels, parallel
  3  lctx.infer, lctx.convert            model (convert: data's tokenizers too)
  4  lctx.load / lctx.models             the loader: any source -> Model
  5  lctx.training, lctx.eval, lctx.bench
  6  lctx.train, lctx.kvcache,           entry points; the root re-exports lctx.load
     lctx.generate, lctx (the root)
  7  experiments                         studies and notebooks' scripts
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLOORS = {
    "lctx.compat": 0, "lctx.cli": 0, "lctx.data": 0,
    "lctx.parallel": 1, "lctx.kernels": 1,
    "lctx.model": 2,
    "lctx.infer": 3, "lctx.convert": 3,
    "lctx.load": 4, "lctx.models": 4,
    "lctx.training": 5, "lctx.eval": 5, "lctx.bench": 5,
    "lctx.train": 6, "lctx.kvcache": 6, "lctx.generate": 6, "lctx": 6,
    "experiments": 7,
}

# Imported inside a function so that lctx works, and imports fast, without them: the
# [hf] extra, plotting and logging back ends, Orbax, TFDS, one tokenizer kind's
# library, and the Pallas back end of the platform in use.
HEAVY_OPTIONAL = ("torch", "transformers", "safetensors", "accelerate", "gguf", "matplotlib",
                  "tensorboardX", "orbax", "tensorflow", "tensorflow_datasets", "sentencepiece",
                  "tokenizers", "jax.experimental.pallas.tpu", "jax.experimental.pallas.triton",
                  "jax.experimental.pallas.mosaic_gpu")

# Modules that may import anything inside functions, and why.
LAZY_MODULES = {
    "lctx": "`import lctx` stays light: lctx.load loads the library on first use",
    "lctx.train": "parses and checks its flags before JAX, the library and jax.distributed start",
    "lctx.eval.__main__": "parses and checks its flags before JAX and the library load",
}


@dataclasses.dataclass(frozen=True)
class Import:
    """`source` imports `target` at `line` (in a function if `lazy`)."""

    source: str
    target: str
    line: int
    lazy: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files() -> dict[str, Path]:
    """Module name -> file, for lctx/ and experiments/."""
    return {module_name(p): p for top in ("lctx", "experiments") for p in (ROOT / top).rglob("*.py")}


def _lazy_nodes(tree: ast.AST) -> set[int]:
    """ids of the import statements inside a function body."""
    return {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}


def imports_of(module: str, path: Path, modules: set[str]) -> list[Import]:
    """Every name `module` imports. `from a import b` gives `a.b`, except where `a` is
    an lctx module and `a.b` is not a module in the tree (then `a`); relative imports
    are resolved against the package."""
    tree = ast.parse(path.read_text(), str(path))
    lazy = _lazy_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules or not is_lctx(base)
                       else base for a in node.names]
        else:
            continue
        found += [Import(module, t, node.lineno, id(node) in lazy) for t in dict.fromkeys(targets)]
    return found


def all_imports() -> list[Import]:
    files = python_files()
    return [i for m, p in sorted(files.items()) for i in imports_of(m, p, set(files))]


def is_lctx(name: str) -> bool:
    return name == "lctx" or name.startswith("lctx.")


def package_of(module: str) -> str:
    """lctx.x for a module of the package lctx/x/ (or the module lctx/x.py); experiments."""
    parts = module.split(".")
    return "experiments" if parts[0] == "experiments" else ".".join(parts[:2])


def internal(imports: list[Import]) -> list[Import]:
    return [i for i in imports if is_lctx(i.target)]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def _describe(component: list[str], imports: list[Import], key) -> list[str]:
    """The imports that join the members of one cycle, as 'source -> target (line)'."""
    members = set(component)
    return sorted({f"{i.source} -> {i.target} (line {i.line}{', in a function' if i.lazy else ''})"
                   for i in imports if key(i.source) in members and key(i.target) in members
                   and key(i.source) != key(i.target)})


def test_every_package_has_a_floor():
    packages = {package_of(m) for m in python_files()}
    assert not packages - set(FLOORS), f"give {sorted(packages - set(FLOORS))} a floor in FLOORS"


def test_no_import_cycles_between_packages():
    imports = internal(all_imports())
    edges: dict[str, set[str]] = {}
    for i in imports:
        if package_of(i.source) != package_of(i.target):
            edges.setdefault(package_of(i.source), set()).add(package_of(i.target))
    found = [f"{' <-> '.join(c)}: {'; '.join(_describe(c, imports, package_of))}"
             for c in cycles(edges)]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_no_import_cycles_between_modules():
    imports = internal(all_imports())
    edges: dict[str, set[str]] = {}
    for i in imports:
        edges.setdefault(i.source, set()).add(i.target)
    found = [f"{' <-> '.join(c)}: {'; '.join(_describe(c, imports, lambda m: m))}"
             for c in cycles(edges)]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_imports_go_down_the_floors():
    upward = [f"{i.source} (floor {FLOORS[package_of(i.source)]}) -> {i.target} "
              f"(floor {FLOORS[package_of(i.target)]}), line {i.line}"
              for i in internal(all_imports())
              if FLOORS.get(package_of(i.target), -1) > FLOORS.get(package_of(i.source), 99)]
    assert not upward, "imports up the floors:\n" + "\n".join(upward)


def _heavy(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HEAVY_OPTIONAL)


def _imports_heavy_at_module_level(module: str, imports: list[Import]) -> bool:
    return any(i.source == module and not i.lazy and _heavy(i.target) for i in imports)


def test_imports_inside_functions_are_for_optional_heavy_dependencies():
    """A function may import a heavy optional dependency, or an lctx module that imports
    one at module level (kernels.pallas_tpu: Mosaic); LAZY_MODULES may import anything."""
    imports = all_imports()
    wrong = [f"{i.source} imports {i.target} inside a function (line {i.line})"
             for i in imports
             if i.lazy and is_lctx(i.source) and i.source not in LAZY_MODULES
             and not _heavy(i.target)
             and not (is_lctx(i.target) and _imports_heavy_at_module_level(i.target, imports))]
    assert not wrong, "move to module level:\n" + "\n".join(wrong)


def test_the_checks_see_cycles_floors_and_lazy_imports(tmp_path):
    """The parser and the cycle search on a hand-made tree: a function-level import
    closes a cycle, `from a import b` names the submodule, relative imports resolve."""
    pkg = tmp_path / "lctx" / "p"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from lctx.p import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    import torch\n")
    modules = {"lctx.p", "lctx.p.a", "lctx.p.b"}
    got = imports_of("lctx.p.b", pkg / "b.py", modules)
    assert got == [Import("lctx.p.b", "lctx.p.a", 2, True), Import("lctx.p.b", "torch", 3, True)]
    edges = {"lctx.p.a": {"lctx.p.b"}, "lctx.p.b": {"lctx.p.a"}, "lctx.p": {"lctx.p.a"}}
    assert cycles(edges) == [["lctx.p.a", "lctx.p.b"]]
    assert cycles({"x": {"y"}, "y": {"z"}}) == []
    assert _heavy("torch.nn") and not _heavy("torchvision") and not _heavy("tqdm")
