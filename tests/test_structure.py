"""How the package's modules depend on each other: the remote-code files stand alone, each role imports only what its
docstring allows, public names only across modules, and no import circle."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# module name → file; `processing/` is installed as `modeling_sphinx.processing`
PACKAGE_DIRS = {"modeling_sphinx": REPO / "modeling_sphinx", "modeling_sphinx.processing": REPO / "processing"}


# copied flat into saved model folders: they may import only each other, as single-dot siblings
REMOTE_CODE = {
    "modeling_sphinx.configuration_sphinx",
    "modeling_sphinx.modeling_sphinx",
    "modeling_sphinx.processing.image_processing_sphinx",
    "modeling_sphinx.processing.processing_sphinx",
    "modeling_sphinx.processing.tasks_sphinx",
}
# each role's subpackage never imports these (what the subpackages' docstrings say)
FORBIDDEN = {
    "modeling_sphinx.folder": ("training", "evaluation", "serving", "miniature", "inference", "mixing"),
    "modeling_sphinx.training": ("evaluation", "serving", "miniature"),
    "modeling_sphinx.evaluation": ("training", "serving", "miniature"),
    "modeling_sphinx.serving": ("training", "evaluation", "miniature"),
}


def package_modules() -> dict[str, Path]:
    """Every module of the package, subpackages included, by its import name."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """`(imported module, names taken from it, line)` for every import of the package's own modules, at any
    depth of the file (function-level imports make circles too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            target = _absolute(module, node, path.stem == "__init__")
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{name}" for name in names if f"{target}.{name}" in modules]
            found += [(sub, [], node.lineno) for sub in submodules]
            plain = [name for name in names if f"{target}.{name}" not in modules]
            if target in modules and plain:
                found.append((target, plain, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name in modules]
    return found


def private_attributes(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """`(module, private name, line)` wherever a file reaches `module._name` on a package module it imported."""
    bound = {}
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _absolute(module, node, path.stem == "__init__")
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{target}.{alias.name}"
        elif isinstance(node, ast.Import):
            bound.update({alias.asname: alias.name for alias in node.names if alias.asname and alias.name in modules})
    return [
        (bound[node.value.id], node.attr, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in bound
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    ]


def test_the_remote_code_files_import_only_each_other_as_siblings():
    modules = package_modules()
    assert set(modules) >= REMOTE_CODE
    offenders = []
    for module in sorted(REMOTE_CODE):
        path = modules[module]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = _absolute(module, node, False)
                if node.level != 1 or target not in REMOTE_CODE:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {'.' * node.level}{node.module}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                offenders += [
                    f"{path.relative_to(REPO)}:{node.lineno} imports {n}"
                    for n in names
                    if n.startswith("modeling_sphinx")
                ]
    assert not offenders, "\n".join(offenders)


def test_each_role_imports_only_what_it_may_and_no_tool_imports_the_miniature():
    modules = package_modules()
    offenders = []
    for module, path in modules.items():
        forbidden = next((roles for package, roles in FORBIDDEN.items() if module.startswith(package)), ())
        if not module.startswith(("modeling_sphinx.miniature", "modeling_sphinx.cli")):
            forbidden = {*forbidden, "miniature"}
        for target, _, line in imports_of(module, path, modules):
            role = target.removeprefix("modeling_sphinx.").split(".")[0]
            if role in forbidden:
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not offenders, "\n".join(offenders)


def test_no_module_takes_a_private_name_from_another():
    modules = package_modules()
    files = {**{f"file {p.relative_to(REPO)}": p for p in REPO.glob("tests/*.py")}}
    files.update({f"file {p.relative_to(REPO)}": p for p in REPO.glob("benchmarks/*.py")})
    files.update({f"file {p.relative_to(REPO)}": p for p in REPO.glob("recipes/**/*.py")})
    offenders = []
    for module, path in [*modules.items(), *files.items()]:
        for target, names, line in imports_of(module, path, modules):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                offenders.append(f"{path.relative_to(REPO)}:{line} takes {private} from {target}")
        for target, name, line in private_attributes(module, path, modules):
            offenders.append(f"{path.relative_to(REPO)}:{line} reaches {target}.{name}")
    assert not offenders, "\n".join(offenders)


def circles_in(graph: dict[str, set[str]]) -> list[str]:
    """Every import circle a depth-first walk meets, as `a -> b -> a`."""
    circles, state = [], {}

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return circles


def test_the_package_has_no_import_circle():
    modules = package_modules()
    graph = {
        module: {t for t, _, _ in imports_of(module, path, modules) if t not in (module, "modeling_sphinx")}
        for module, path in modules.items()
    }  # the package's __init__ only registers the Auto classes
    assert len(graph) > 25 and graph["modeling_sphinx.cli"]
    assert not circles_in(graph), "\n".join(circles_in(graph))


def test_the_checks_see_what_they_judge(tmp_path):
    """The walkers find a private name taken and a circle in code made to have them."""
    modules = {"modeling_sphinx.cli": Path("cli.py"), "modeling_sphinx.miniature.demo": Path("demo.py")}
    demo = tmp_path / "demo.py"
    demo.write_text("def run():\n    from ..cli import _draw\n")
    assert imports_of("modeling_sphinx.miniature.demo", demo, modules) == [("modeling_sphinx.cli", ["_draw"], 2)]
    bench = tmp_path / "bench.py"
    bench.write_text("from modeling_sphinx import cli\ncli._draw()\n")
    assert private_attributes("bench", bench, modules) == [("modeling_sphinx.cli", "_draw", 2)]
    circle = {
        "modeling_sphinx.cli": {"modeling_sphinx.miniature.demo"},
        "modeling_sphinx.miniature.demo": {"modeling_sphinx.cli"},
    }
    assert circles_in(circle) == ["modeling_sphinx.cli -> modeling_sphinx.miniature.demo -> modeling_sphinx.cli"]
