"""The learner's own parts, carried forward: d2l's ``#@save`` idea, for the answers a learner writes.

An answer cell of Sections 2-4 whose first line is ``#@save`` is the learner's to keep. The last cell of those
sections calls :func:`save_my_parts`, which reads the kernel's input history and writes the **latest executed
version** of every such cell into ``my_deepseek/sNN_name.py`` beside the learner's notebooks, under the section's
imports (``header``). Section 5 then builds its model from them with :func:`my_part`, which falls back to the
course's part, in one printed line, wherever the learner's is missing or wrong::

    # end of Section 2 (a given cell)
    save_my_parts("02_mla", header=HEADER)     # -> ../my_deepseek/s02_mla.py

    # Section 5
    MLA = my_part("02_mla", "MultiHeadLatentAttention", fallback=CourseMLA, check=same_as_course)

Rules:

- Cells are keyed by the names they define (top-level ``def``, ``class``, assignments): a cell run again, edited or
  not, replaces the earlier version that defined any of the same names, in its place. Parts saved by an earlier
  kernel session stay unless this session redefines them, so a restart does not lose work.
- The folder is ``$COURSE_MY_PARTS`` when set, else ``my_deepseek/`` in the parent folder of the kernel's working
  directory (``release/my_deepseek/`` when working in ``release/02_mla/``). Never inside ``course_lib``.
- While grading (``NBGRADER_EXECUTION`` set, as ``course_lib.utils.is_grading``) nothing is written, and
  ``my_part`` always returns the fallback: each section is graded on its own, so a mistake in Section 2 never costs
  points in Section 5. Both say so in one line.
- ``my_part`` loads the file with ``importlib`` (no ``sys.path`` change). ``check(obj)`` is a quick comparison with
  the fallback: it fails by raising (its message is shown) or returning ``False``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["SAVE_MARK", "FOLDER", "parts_dir", "module_path", "latest_cells", "save_my_parts", "my_part", "saved_part", "load_saved"]

SAVE_MARK = "#@save"
FOLDER = "my_deepseek"
_BLOCK = re.compile(r"^# %% #@save: (?P<names>.*)$", re.M)  # a saved cell's first line in the module file
_PACKAGE = Path(__file__).resolve().parent
Block = tuple[tuple[str, ...], str]  # (names a cell defines, its code)


def _grading() -> str | None:
    return os.environ.get("NBGRADER_EXECUTION") or None


def _section_label(section: str) -> str:
    return f"Section {int(section[:2])}" if section[:2].isdigit() else section


def parts_dir() -> Path:
    """``$COURSE_MY_PARTS``, else ``<parent of the working directory>/my_deepseek``."""
    env = os.environ.get("COURSE_MY_PARTS")
    return Path(env).expanduser() if env else Path.cwd().parent / FOLDER


def module_path(section: str) -> Path:
    """``my_deepseek/s02_mla.py`` for ``"02_mla"``."""
    return parts_dir() / f"s{section}.py"


def _shown(path: Path) -> str:
    """``$COURSE_MY_PARTS/s02_mla.py`` when the folder is overridden; else the path relative to the working directory
    when it is nearby (``../my_deepseek/s02_mla.py``), else absolute."""
    env = os.environ.get("COURSE_MY_PARTS")
    if env and Path(path).resolve().parent == Path(env).expanduser().resolve():
        return f"$COURSE_MY_PARTS/{Path(path).name}"
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive
        return str(path)
    return rel if not rel.startswith(os.path.join("..", "..")) else str(path)


def _defined_names(tree: ast.Module) -> list[str]:
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names += [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]
    return list(dict.fromkeys(names))


def _body(cell: str) -> str | None:
    """The cell without its ``#@save`` line and IPython magics, or None if it is not a ``#@save`` cell."""
    lines = cell.strip("\n").split("\n")
    if not lines or lines[0].strip() != SAVE_MARK:
        return None
    kept = [ln for ln in lines[1:] if not ln.lstrip().startswith(("%", "!"))]
    return "\n".join(kept).strip("\n")


def latest_cells(inputs: Iterable[str], earlier: Iterable[Block] = ()) -> tuple[list[Block], int]:
    """The latest version of each ``#@save`` cell among ``inputs`` (in execution order), keyed by the names it defines.

    ``earlier``: ``(names, code)`` blocks saved before (kept unless a cell here defines one of their names).
    Returns the blocks in first-appearance order and the number of ``#@save`` cells skipped for a syntax error.
    """
    blocks: list[Block] = list(earlier)
    bad = 0
    for cell in inputs:
        body = _body(cell)
        if body is None:
            continue
        try:
            names = tuple(_defined_names(ast.parse(body)))
        except SyntaxError:
            bad += 1  # it defined nothing in the kernel either: the previous version stays
            continue
        if not names:
            continue
        hits = [i for i, (old, _) in enumerate(blocks) if set(old) & set(names)]
        if hits:
            blocks[hits[0]] = (names, body)
            blocks = [b for i, b in enumerate(blocks) if i not in hits[1:]]
        else:
            blocks.append((names, body))
    return blocks, bad


def _saved_blocks(text: str) -> list[Block]:
    marks = list(_BLOCK.finditer(text))
    out = []
    for m, nxt in zip(marks, marks[1:] + [None]):
        code = text[m.end(): nxt.start() if nxt else len(text)].strip("\n")
        out.append((tuple(n.strip() for n in m["names"].split(",") if n.strip()), code))
    return out


def _render(section: str, header: str, blocks: list[Block]) -> str:
    label = _section_label(section)
    head = [
        f'"""Your {label} parts ({section}), written by course_lib.learner.save_my_parts from the #@save cells you ran.',
        "",
        f"Edit the cells in your notebook, not this file: run them, then the last cell of {label} again.",
        '"""',
        "",
        header.strip("\n"),
        "",
    ]
    body = []
    for names, code in blocks:
        body += ["", f"# %% #@save: {', '.join(names)}", code, ""]
    return "\n".join(head + body).rstrip("\n") + "\n"


def _import_error(path: Path) -> str | None:
    """None if the file imports, else a one-line reason."""
    try:
        _load(path, fresh=True)
    except BaseException as e:  # noqa: BLE001 - anything the learner's code raises is the reason
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def save_my_parts(section: str, header: str = "", *, shell: Any = None) -> Path | None:
    """Write the latest version of every executed ``#@save`` cell of this kernel to ``my_deepseek/s<section>.py``.

    ``header``: the section's imports, written on top. Returns the file's path, or None when nothing was written
    (grading, no IPython kernel, no ``#@save`` cell run yet). Prints one line saying what happened.
    """
    label = _section_label(section)
    mode = _grading()
    if mode:
        print(f"my parts: nothing saved while grading (NBGRADER_EXECUTION={mode}); "
              f"run this cell in JupyterLab to keep your {label} parts for Section 5")
        return None
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:  # pragma: no cover - IPython comes with Jupyter
            get_ipython = None
        shell = get_ipython() if get_ipython else None
    if shell is None:
        print("my parts: nothing saved: save_my_parts reads the kernel's input history, run it in a Jupyter notebook")
        return None
    path = module_path(section).resolve()
    if path.parent == _PACKAGE or _PACKAGE in path.parents:
        print(f"my parts: nothing saved: {path.parent} is inside course_lib; set COURSE_MY_PARTS to another folder")
        return None
    earlier = _saved_blocks(path.read_text()) if path.exists() else []
    blocks, bad = latest_cells(shell.history_manager.input_hist_raw, earlier)
    skipped = f" ({bad} #@save cell{'s' if bad > 1 else ''} with a syntax error skipped)" if bad else ""
    if not blocks:
        print(f"my parts: nothing to save yet: no cell starting with {SAVE_MARK} has run in this kernel{skipped}")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".py.tmp")
    tmp.write_text(_render(section, header, blocks))
    os.replace(tmp, path)
    names = [n for ns, _ in blocks for n in ns]
    problem = _import_error(path)
    where = _shown(path)
    if problem:
        print(f"my parts: saved {', '.join(names)} to {where}, but it does not import ({problem}): "
              f"Section 5 will use the course's parts until it does{skipped}")
    else:
        print(f"my parts: saved {', '.join(names)} to {where}; Section 5 builds on them{skipped}")
    return path


_CACHE: dict[str, tuple[tuple[int, int], ModuleType]] = {}


def _load(path: Path, *, fresh: bool = False) -> ModuleType:
    """Import ``path`` as a module (importlib, no sys.path change); cached while the file is unchanged."""
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    key = str(path.resolve())
    if not fresh and key in _CACHE and _CACHE[key][0] == stamp:
        return _CACHE[key][1]
    name = "_my_deepseek_" + re.sub(r"\W", "_", path.stem) + "_" + hashlib.sha1(key.encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    _CACHE[key] = (stamp, module)
    return module


def my_part(section: str, name: str, fallback: Any, check: Callable[[Any], object] | None = None) -> Any:
    """The learner's ``name`` from ``my_deepseek/s<section>.py``, or ``fallback`` (with one line saying why).

    Falls back when the file is missing, does not import, lacks ``name``, or ``check(obj)`` raises or returns
    ``False``; always while grading.
    """
    label = _section_label(section)
    mode = _grading()
    if mode:
        print(f"using the course's {name}: grading uses the course's parts (NBGRADER_EXECUTION={mode}), "
              "so every section is graded on its own")
        return fallback

    def fall(reason: str) -> Any:
        print(f"using the course's {name}: {reason}")
        return fallback

    path = module_path(section)
    if not path.exists():
        return fall(f"yours is not saved yet (run the last cell of {label})")
    try:
        module = _load(path)
    except BaseException as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else ""
        return fall(f"your saved {label} parts do not import ({type(e).__name__}: {msg}); fix the cell in {label}, "
                    f"run it, then its last cell")
    if not hasattr(module, name):
        return fall(f"your saved {label} parts have no {name} (run its cell, then the last cell of {label})")
    obj = getattr(module, name)
    if check is not None:
        try:
            ok = check(obj)
        except NotImplementedError:
            return fall(f"yours is not finished yet (NotImplementedError; finish it in {label}, then run its last cell)")
        except BaseException as e:  # noqa: BLE001
            msg = str(e).splitlines()[0] if str(e) else ""
            return fall(f"yours differs from it in a quick check ({type(e).__name__}: {msg})")
        if ok is False:
            return fall("yours differs from it in a quick check")
    print(f"using your {name} (from {_shown(path)})")
    return obj


def saved_part(section: str, name: str, default: Any = None) -> Any:
    """The learner's saved ``name`` from ``my_deepseek/s<section>.py`` without a word: ``default`` when it is missing,
    does not import, or while grading. For helpers a checked part needs (use :func:`my_part` for the part itself)."""
    path = module_path(section)
    if _grading() or not path.exists():
        return default
    try:
        return getattr(_load(path), name, default)
    except BaseException:  # noqa: BLE001 - my_part reports the same failure for the part itself
        return default


def load_saved(path: Path) -> ModuleType:
    """The module a ``save_my_parts`` file defines (cached while unchanged), e.g. in a worker process that was
    handed its path."""
    return _load(Path(path))
