"""Static checks on the submitted source, run by the grader (the kernel cannot influence them).

- :func:`reference_use`: learner code that imports or names a ``course_lib`` module holding the
  answer to an exercise (or a module that imports one) gets that exercise refused (0 points, REVIEW).
- :func:`scan`: constructs with no place in an answer (kernel hooks, threads, dynamic imports,
  ``exec``/``eval``, frame access, grader paths ...): flagged for a person, never penalised.
- :func:`similarity`: how much of an answer cell is the reference implementation's source, by
  copydetect's winnowed fingerprints (names and literals normalised); above a threshold: REVIEW.
- :func:`kernel_modules`: the ``course_lib`` files a section's grading kernel may import (what its
  given, check and demo cells import, and what those import), never its answer modules.
"""

from __future__ import annotations

import ast
import io
import re
from functools import cache
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "course_lib"
ALWAYS_IN_KERNEL = ("course_lib", "course_lib.agent", "course_lib.wire", "course_lib.drafts")
SIMILARITY_REVIEW = 0.6  # share of an answer's tokens found in the reference's source

# ---------------------------------------------------------------- learner cells


def cell_source(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else str(s)


def _meta(cell: dict) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def learner_cells(nb: dict) -> list[tuple[str, str]]:
    """(label, source) of every code cell the learner can edit: answer cells and cells of their own."""
    out = []
    for i, c in enumerate(nb.get("cells", [])):
        if not isinstance(c, dict) or c.get("cell_type") != "code":
            continue
        m = _meta(c)
        if m.get("locked") and not m.get("solution"):
            continue
        out.append((m.get("grade_id") or f"cell {i}", cell_source(c)))
    return out


def _parse(src: str) -> ast.Module | None:
    code = "\n".join(ln for ln in src.split("\n") if not ln.lstrip().startswith(("%", "!")))
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


# ---------------------------------------------------------------- the course_lib import graph


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "course_lib":
        return None
    base = LIB.joinpath(*parts[1:])
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(LIB.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_course_modules(tree: ast.AST, current: str | None = None) -> set[str]:
    """``course_lib`` modules an AST imports (``from course_lib.deepseek import mla`` counts ``...mla``)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level and current:
                pkg = current.split(".")
                if not (module_file(current) or Path()).name == "__init__.py":
                    pkg = pkg[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                mod = ".".join(pkg + ([mod] if mod else []))
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for n in names:
            parts = n.split(".")
            for k in range(1, len(parts) + 1):
                cand = ".".join(parts[:k])
                if module_file(cand):
                    found.add(cand)
    return found


@cache
def _graph() -> dict[str, frozenset[str]]:
    g = {}
    for f in sorted(LIB.rglob("*.py")):
        name = _module_name(f)
        tree = _parse(f.read_text())
        g[name] = frozenset(imported_course_modules(tree, name) - {name}) if tree else frozenset()
    return g


def closure(modules: set[str]) -> set[str]:
    """``modules`` and every course_lib module they import, transitively (packages included)."""
    g, out, todo = _graph(), set(), list(modules)
    while todo:
        m = todo.pop()
        if m in out or m not in g:
            continue
        out.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:k]) for k in range(1, len(parts))]
        todo += list(g[m])
    return out


def importers(modules: set[str]) -> set[str]:
    """``modules`` and every course_lib module that imports one of them, transitively."""
    g, out = _graph(), set(modules)
    changed = True
    while changed:
        changed = False
        for m, deps in g.items():
            if m not in out and deps & out:
                out.add(m)
                changed = True
    return out


def kernel_modules(nb: dict) -> set[str]:
    """What the course's own code cells of a notebook need: the import closure of its locked and demo cells."""
    wanted = set(ALWAYS_IN_KERNEL)
    for c in nb.get("cells", []):
        if not isinstance(c, dict) or c.get("cell_type") != "code":
            continue
        m = _meta(c)
        if m.get("solution") or m.get("grade"):
            continue
        tree = _parse(cell_source(c))
        if tree is not None:
            wanted |= imported_course_modules(tree)
    return closure(wanted)


def forbidden_modules(answer_modules: set[str]) -> set[str]:
    """The answer modules and every course_lib module that imports one (each hands the answer over)."""
    return importers(set(answer_modules))


# ---------------------------------------------------------------- use of the answer key


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def references(src: str) -> set[str]:
    """course_lib / course_judge modules a piece of code imports or names (attribute chains included)."""
    tree = _parse(src)
    if tree is None:
        return set()
    found = imported_course_modules(tree)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if id(node) in docstrings:  # prose (the given docstrings name course modules), not a use
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found |= {m for m in mods if m.split(".")[0] == "course_judge"}
        elif isinstance(node, ast.Attribute):
            d = _dotted(node)
            if d and d.split(".")[0] in ("course_lib", "course_judge"):
                parts = d.split(".")
                found |= {".".join(parts[:k]) for k in range(1, len(parts) + 1) if module_file(".".join(parts[:k]))}
                if parts[0] == "course_judge":
                    found.add(d)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(r"course_(lib|judge)[./]\w", node.value):
            for m in re.findall(r"course_(?:lib|judge)(?:[./]\w+)+", node.value):  # dotted names and file paths
                parts = m.removesuffix(".py").replace("/", ".").split(".")
                found |= {".".join(parts[:k]) for k in range(1, len(parts) + 1)
                          if module_file(".".join(parts[:k])) or parts[0] == "course_judge"}
    return found


def reference_use(nb: dict, answer_modules: set[str]) -> str:
    """Why an exercise is refused because the learner's code uses its answer (``""`` if it does not)."""
    if not answer_modules:
        return ""
    bad = forbidden_modules(answer_modules)
    for label, src in learner_cells(nb):
        refs = references(src)
        hit = sorted(r for r in refs if r in bad or r.startswith("course_judge"))
        if hit:
            return (f"{label} uses {hit[0]}, which holds the course's answer to this exercise (importing, subclassing, "
                    "wrapping or calling it is not your own work): this exercise scores 0")
    return ""


def _names_in(tree: ast.AST | None) -> set[str]:
    """Every name a cell mentions: variables, attributes, and what its imports bring in (also under an alias)."""
    if tree is None:
        return set()
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    # ``from m import name as _x`` brings the name in under another one
    used |= {a.name.rsplit(".", 1)[-1] for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}
    return used


def _bound_in(tree: ast.AST | None) -> set[str]:
    """The names a cell binds: assignments (``Name = ``, ``Name.attr = ``), definitions, imports, loop targets."""
    if tree is None:
        return set()
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(n.name)
        elif isinstance(n, ast.Import | ast.ImportFrom):
            out |= {(a.asname or a.name).split(".", 1)[0] for a in n.names}
        elif isinstance(n, ast.Name | ast.Attribute) and isinstance(n.ctx, ast.Store):
            base = n
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name):
                out.add(base.id)
    return out


GIVEN_FOR_OTHER_PURPOSES = "which the course gives for other purposes and which answers this exercise for you"


def forbidden_name_use(nb: dict, answer_ids: tuple[str, ...], names: set[str] | dict[str, str]) -> str:
    """Why an exercise is refused because its answer cells use a name the kernel has but the answer may not, or
    another cell the learner can edit rebinds the answer to it (``kv_cache_bytes = make_kv_cache_bytes()``, also
    through a variable of an earlier cell). ``names`` maps each name to why it is refused (a set: the default)."""
    if not names:
        return ""
    why = dict(names) if isinstance(names, dict) else dict.fromkeys(names, GIVEN_FOR_OTHER_PURPOSES)
    names = set(why)
    answers = {id(c) for c in nb.get("cells", []) if isinstance(c, dict) and _meta(c).get("grade_id") in answer_ids}
    answer_names = set()
    for c in nb.get("cells", []):
        if id(c) in answers:
            tree = _parse(cell_source(c))
            answer_names |= {n.name for n in (tree.body if tree else []) if isinstance(n, ast.FunctionDef | ast.ClassDef)}
            answer_names |= {t.id for n in (tree.body if tree else []) if isinstance(n, ast.Assign) for t in n.targets
                             if isinstance(t, ast.Name)}
    tainted = set(names)  # the forbidden names and what other cells made from them
    for c in nb.get("cells", []):
        if not isinstance(c, dict) or c.get("cell_type") != "code":
            continue
        m = _meta(c)
        tree = _parse(cell_source(c))
        if id(c) in answers:
            hit = sorted(_names_in(tree) & names)
            if hit:
                return f"{m['grade_id']} uses {hit[0]}, {why[hit[0]]}: this exercise scores 0"
        elif not m.get("locked") or m.get("solution"):  # a cell the learner can edit or added
            if _names_in(tree) & tainted:
                bound = _bound_in(tree)
                rebound = sorted(bound & answer_names)
                if rebound:
                    return (f"a cell outside the answer ({m.get('grade_id') or 'one you added or edited'}) binds "
                            f"{rebound[0]} to {sorted(_names_in(tree) & tainted)[0]}, which the course gives for other "
                            "purposes and which answers this exercise for you: this exercise scores 0")
                tainted |= bound
    return ""


def rejection(nb: dict, module) -> str:
    """Why a judge module refuses to grade an exercise at all (``""``: it grades it)."""
    return (reference_use(nb, set(getattr(module, "REFERENCE", ())))
            or forbidden_name_use(nb, tuple(getattr(module, "ANSWERS", ())), getattr(module, "FORBIDDEN_NAMES", ())))


# ---------------------------------------------------------------- constructs a person should look at

SUSPICIOUS_MODULES = {
    "threading": "starts threads", "_thread": "starts threads", "multiprocessing": "starts processes",
    "asyncio": "schedules background tasks", "signal": "handles signals", "socket": "opens network connections",
    "urllib": "opens network connections", "requests": "opens network connections", "http": "opens network connections",
    "ftplib": "opens network connections", "smtplib": "opens network connections", "subprocess": "runs programs",
    "pty": "runs programs", "ctypes": "calls C directly", "gc": "walks the interpreter's objects",
    "inspect": "inspects frames", "builtins": "touches builtins", "importlib": "imports modules dynamically",
    "IPython": "talks to IPython", "ipykernel": "talks to the kernel", "nbgrader": "imports the grader",
    "course_judge": "imports the grader", "linecache": "reads executed source", "marshal": "loads code objects",
    "pickle": "loads pickled objects",
}
SUSPICIOUS_CODE = [
    (re.compile(r"^get_ipython$|^__import__$|^__builtins__"), "talks to IPython or the import system"),
    (re.compile(r"input_transformers|ast_transformers|set_custom_exc|events\.register|displayhook|excepthook|"
                r"showtraceback|run_cell|shell_handlers|iopub|\.session\b|get_parent|parent_header"), "hooks the kernel's cell execution"),
    (re.compile(r"^sys\.(settrace|setprofile|addaudithook|modules|meta_path|path_hooks|_getframe|prefix|stdout|stderr|__stdout__)"),
     "changes interpreter internals"),
    (re.compile(r"^os\.(system|popen|exec\w*|spawn\w*|fork\w*|_exit|kill\w*)$"), "runs or stops processes"),
    (re.compile(r"__code__|__globals__|f_globals|f_locals|f_back|tb_frame|__closure__|__subclasses__"),
     "reaches into frames or code objects"),
]
DYNAMIC_CALLS = {"exec": "runs code built at run time", "eval": "runs code built at run time",
                 "compile": "runs code built at run time", "open": "opens files",
                 "globals": "reads the notebook's globals dynamically", "vars": "reads namespaces dynamically"}
PATCHABLE_ROOTS = {"course_lib", "torch", "F", "np", "numpy", "math", "nn", "plt"}
GRADER_PATHS = re.compile(r"gradebook|(^|/)(source|solutions|release|autograded|submitted|feedback)(/|$)|\.\./|^/(?!tmp\b)\w+/")


def _root_name(node) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def suspicious(src: str) -> list[tuple[str, str]]:
    """(why, what) for each construct in ``src`` that a person should look at."""
    tree = _parse(src)
    if tree is None:
        return []
    hits: list[tuple[str, str]] = []
    patchable = set(PATCHABLE_ROOTS)
    for node in ast.walk(tree):  # aliases of course or library modules count as those modules
        if isinstance(node, ast.Import):
            patchable |= {a.asname for a in node.names if a.asname and a.name.split(".")[0] in PATCHABLE_ROOTS}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PATCHABLE_ROOTS:
            patchable |= {a.asname or a.name for a in node.names}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [n.name for n in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                root = m.split(".")[0]
                if root in SUSPICIOUS_MODULES:
                    hits.append((SUSPICIOUS_MODULES[root], f"import {m}"))
        elif isinstance(node, (ast.Attribute, ast.Name)):
            dotted = ast.unparse(node)
            for pat, why in SUSPICIOUS_CODE:
                if pat.search(dotted):
                    hits.append((why, dotted[:40]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) < 300:
            if GRADER_PATHS.search(node.value):
                hits.append(("refers to the grader's files or absolute paths", repr(node.value[:40])))
            for pat, why in SUSPICIOUS_CODE:  # names spelled as strings (getattr, attrgetter, __import__)
                if any(pat.search(part) for part in re.split(r"[^\w.]+", node.value) if part):
                    hits.append((why, repr(node.value[:40])))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            if name in DYNAMIC_CALLS:
                hits.append((DYNAMIC_CALLS[name], name))
            if name in ("getattr", "setattr", "delattr", "hasattr") and len(node.args) >= 2 and not isinstance(node.args[1], ast.Constant):
                hits.append(("looks up attributes by computed names", ast.unparse(node)[:40]))
            if name in ("setattr", "delattr") and node.args and _root_name(node.args[0]) in patchable:
                hits.append(("replaces library functions", ast.unparse(node)[:40]))
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            if isinstance(t, ast.Attribute) and _root_name(t) in patchable and not ast.unparse(t).startswith("torch.backends"):
                hits.append(("replaces library functions", ast.unparse(t)[:40]))
    return hits


def scan(nb: dict) -> list[str]:
    """Reasons to review a notebook: suspicious constructs in the learner's code cells (comments ignored)."""
    found: dict[str, str] = {}
    for _, src in learner_cells(nb):
        for why, what in suspicious(src):
            found.setdefault(why, what)
    return [f"{why} ({what})" for why, what in found.items()]


# ---------------------------------------------------------------- similarity to the reference


def similarity(answer: str, reference: str, k: int = 25, window: int = 1, given: str = "") -> float:
    """Share of ``answer``'s tokens that also occur in ``reference`` (copydetect winnowing, names normalised).

    ``given``: code the learner was handed (the released cell: signatures, docstrings): its fingerprints are
    boilerplate, so scaffolding shared with the reference does not count as copying.
    """
    from copydetect import CodeFingerprint, compare_files

    if not answer.strip() or not reference.strip():
        return 0.0
    try:
        boiler = list(CodeFingerprint("given.py", k, window, fp=io.StringIO(given)).hashes) if given.strip() else []
        a = CodeFingerprint("answer.py", k, window, boilerplate=boiler, fp=io.StringIO(answer))
        r = CodeFingerprint("reference.py", k, window, boilerplate=boiler, fp=io.StringIO(reference))
    except Exception:  # noqa: BLE001 - unparsable code is not similar to anything
        return 0.0
    if not len(a.hashes) or not len(r.hashes):
        return 0.0
    _, (sim_a, _), _ = compare_files(a, r)
    return float(sim_a)


def answer_source(nb: dict, answer_ids: tuple[str, ...]) -> str:
    """The learner's code in an exercise's answer cells, solution markers and stub comments dropped."""
    parts = []
    for c in nb.get("cells", []):
        if isinstance(c, dict) and _meta(c).get("grade_id") in answer_ids:
            parts.append("\n".join(ln for ln in cell_source(c).split("\n") if not ln.strip().startswith("###")))
    return "\n".join(parts)


def similarity_review(nb: dict, module, release: dict | None = None) -> list[str]:
    """REVIEW reasons when an exercise's answer is mostly the source of a course module that answers it.

    ``release``: the released notebook, whose answer cells (the scaffolding) are not counted as copied.
    """
    answers = tuple(getattr(module, "ANSWERS", ()))
    answer = answer_source(nb, answers)
    given = answer_source(release, answers) if release else ""
    out = []
    for name in getattr(module, "REFERENCE", ()):
        f = module_file(name)
        if f is None:
            continue
        share = similarity(answer, f.read_text(), given=given)
        if share >= SIMILARITY_REVIEW:
            out.append(f"the answer to {module.GRADE_ID} is {100 * share:.0f}% the source of {name} (copied reference code?)")
    return out


def answer_cells(nb: dict, answer_ids) -> dict[str, str]:
    """``{grade_id: source}`` of the answer cells ``answer_ids`` as submitted (the last copy of a duplicate wins)."""
    out = {}
    for c in nb.get("cells", []):
        gid = _meta(c).get("grade_id") if isinstance(c, dict) else None
        if gid in set(answer_ids):
            out[gid] = cell_source(c)
    return out
