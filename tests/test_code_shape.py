"""The code's shape rules (developers' brief): no lvllm module over about 400 lines, no C++
function over about 80, only lvllm/vllm/ imports vLLM's internals, no two lvllm modules import
each other (directly or through others), and test modules share helpers through helpers
modules, never by importing one another."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# Kernels whose body is one unrolled register-blocked loop nest: splitting it would hide
# the register allocation the kernel is written for.
UNROLLED_KERNEL_DIRS = ("csrc/lk/kernels/",)
_CONTROL = re.compile(r"\b(if|for|while|switch|catch|do|else)\s*(\(|$)")
_SIGNATURE_END = re.compile(r"\)\s*(const\s*)?(noexcept\s*)?(override\s*)?(->\s*[\w:<>,\s*&]+)?$")


def _strip_comments_and_strings(text: str) -> str:
    """The source with comments and string/char literals blanked (newlines kept)."""
    pattern = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)
    return pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def cpp_functions(path: Path) -> list[tuple[str, int, int]]:
    """(signature head, first line, lines) of every function body in a C++ file, found by
    matching braces: a '{' that follows a ')' (not a control statement) opens one."""
    text = _strip_comments_and_strings(path.read_text(encoding="utf-8"))
    found, stack, statement_start = [], [], 0
    for index, char in enumerate(text):
        if char == "{":
            head = text[statement_start:index].strip()
            is_function = bool(_SIGNATURE_END.search(head)) and not _CONTROL.search(head.split("\n")[-1])
            stack.append((is_function, head, text.count("\n", 0, index) + 1))
            statement_start = index + 1
        elif char == "}":
            if stack:
                is_function, head, line = stack.pop()
                if is_function:
                    last = text.count("\n", 0, index) + 1
                    found.append((" ".join(head.split())[-90:], line, last - line + 1))
            statement_start = index + 1
        elif char == ";":
            statement_start = index + 1
    return found


def test_no_lvllm_module_is_too_long():
    long = {str(path.relative_to(ROOT)): lines for path in sorted((ROOT / "lvllm").rglob("*.py"))
            if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_cpp_function_is_too_long():
    long = []
    for path in sorted((ROOT / "csrc").rglob("*")):
        relative = str(path.relative_to(ROOT))
        if path.suffix not in (".cpp", ".h") or relative.startswith(UNROLLED_KERNEL_DIRS):
            continue
        long += [f"{relative}:{line} ({lines} lines) {head}"
                 for head, line, lines in cpp_functions(path) if lines > MAX_FUNCTION_LINES]
    assert not long, "C++ functions over %d lines:\n%s" % (MAX_FUNCTION_LINES, "\n".join(long))


def test_the_scanner_finds_functions_and_skips_control_blocks(tmp_path):
    source = tmp_path / "a.cpp"
    body = "\n".join("  x += 1;" for _ in range(5))
    source.write_text(f"namespace n {{\nstruct S {{ int f() const {{\n{body}\n  return 1; }} }};\n"
                      f"void g(int x) {{\n  if (x) {{\n{body}\n  }}\n  auto h = [&](int y) {{ return y; }};\n}}\n}}\n")
    found = {head.split("(")[0].split()[-1]: lines for head, _, lines in cpp_functions(source)}
    assert found["f"] == 7 and found["g"] == 10 and "if" not in found


def test_only_lvllm_vllm_imports_vllm_internals():
    """One folder knows vLLM: elsewhere only the names of its environment variables
    (vllm.envs, so lvllm.envs does not take them for misspellings of its own)."""
    public = {"vllm.envs"}
    outside = []
    for path in sorted((ROOT / "lvllm").rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[:2] == ("lvllm", "vllm"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [])
            outside += [f"{relative}: {name}" for name in names if name.split(".")[0] == "vllm" and name not in public]
    assert not outside, outside


def module_imports(package: Path) -> dict[str, set[str]]:
    """Each module of ``package`` (dotted name) -> the package's modules it imports: ``import
    x``, ``from x import y`` (y itself where it is a module), relative imports resolved,
    imports inside functions included."""
    paths = {".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): path
             for path in sorted(package.rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:   # from . (level 1: this module's package), from .. (its parent)
                    base = f"{own_package.rsplit('.', node.level - 1)[0]}.{base}".rstrip(".")
                imported |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base
                             for alias in node.names}
        graph[name] = {module for module in imported if module in paths and module != name}
    return graph


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop (a, b, ..., a) for each group of modules that import one another, directly or
    through others: the shortest through the group's first module."""
    reachable = {module: _reachable(graph, module) for module in graph}
    loops, seen = [], set()
    for module in sorted(graph):
        if module in reachable[module] and module not in seen:
            group = {other for other in reachable[module] if module in reachable[other]}
            seen |= group
            loops.append(_shortest_loop(graph, module, group))
    return loops


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    found, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - found:
            found.add(target)
            todo.append(target)
    return found


def _shortest_loop(graph: dict[str, set[str]], start: str, group: set[str]) -> list[str]:
    previous, order = {start: None}, [start]
    for module in order:   # breadth first: the list grows while it is read
        for target in sorted(graph[module] & group):
            if target not in previous:
                previous[target] = module
                order.append(target)
    path = [next(module for module in order if start in graph[module])]   # the nearest back to start
    while path[-1] != start:
        path.append(previous[path[-1]])
    return [*reversed(path), start]


def test_no_lvllm_modules_import_one_another():
    """Modules are layered: what many share (lvllm.vllm.installation, expert_source_base) sits
    below what builds on it, and nothing below imports anything above, not even inside a
    function."""
    loops = import_loops(module_imports(ROOT / "lvllm"))
    assert not loops, "modules that import one another:\n" + "\n".join(" -> ".join(loop) for loop in loops)


def test_the_import_scanner_finds_a_loop(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {"__init__.py": "", "base.py": "import os\n", "sub/__init__.py": "",
             "a.py": "from pkg.sub import b\nfrom .base import NAME\n",
             "sub/b.py": "def late():\n    from .. import c\n",
             "c.py": "import pkg.a\nfrom pkg import base\n"}
    for name, text in files.items():
        (package / name).write_text(text)
    graph = module_imports(package)
    assert graph == {"pkg": set(), "pkg.base": set(), "pkg.sub": set(), "pkg.a": {"pkg.sub.b", "pkg.base"},
                     "pkg.sub.b": {"pkg.c"}, "pkg.c": {"pkg.a", "pkg.base"}}
    assert import_loops(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    (package / "c.py").write_text("from pkg import base\n")
    assert import_loops(module_imports(package)) == []


def imports_between_test_modules(tests: Path) -> list[str]:
    """'path: name' for each import of a test module by another, in every folder under
    ``tests``: by its name (``import test_x``, ``from .test_x import y``) or from its package
    (``from . import test_x``, ``from tests.vllm import test_x``)."""
    test_modules = {path.stem for path in tests.rglob("test_*.py")}
    found = []
    for path in sorted(tests.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or "", *(alias.name for alias in node.names if alias.name in test_modules)]
                     if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(tests.parent)}: {name}" for name in names
                      if name.split(".")[-1].startswith("test_")]
    return found


def test_no_test_module_imports_another():
    """What tests share lives in a helpers module (tests/helpers.py, tests/lk/helpers.py,
    tests/vllm/e2e_common.py and server_common.py, architecture_table.py): running or changing
    one test module never depends on another."""
    found = imports_between_test_modules(ROOT / "tests")
    assert not found, found


def test_the_test_import_scanner_looks_in_every_folder(tmp_path):
    tests = tmp_path / "tests"
    (tests / "vllm").mkdir(parents=True)
    files = {"test_a.py": "from tests.vllm import test_b\n",
             "vllm/architecture_table.py": "",
             "vllm/test_b.py": "import architecture_table\n\n\ndef test_late():\n    from test_c import helper\n",
             "vllm/test_c.py": "from . import test_b\nfrom architecture_table import BY_KEY\n"}
    for name, text in files.items():
        (tests / name).write_text(text)
    assert imports_between_test_modules(tests) == ["tests/test_a.py: test_b", "tests/vllm/test_b.py: test_c",
                                                   "tests/vllm/test_c.py: test_b"]
