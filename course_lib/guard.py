"""The grading guard: a cell the grader runs before every graded test cell.

A submission's code runs in the same interpreter as the tests that grade it, so it could replace a
test helper (``course_lib.testing.assert_close = lambda *a, **k: None``), rebind a name the tests use
(``F = my_fake_functional``), or hook IPython so that test cells never run. Before each graded test
the grader inserts a cell running :func:`_course_guard`, which

- restores what it can: course helpers whose code no longer matches their source file are reloaded,
  the names the course's locked cells imported are imported again, IPython's input/AST transformers,
  custom exception handlers, event callbacks, display hook, trace/profile functions and import hooks
  that the submission added are removed;
- refuses what it cannot restore: replaced builtins or torch/NumPy functions, patched kernel or
  IPython classes, a redirected stdout, background threads started by the submission. It then
  raises, and the grader gives the following test zero points and flags the submission.

It prints ``[grading guard] ok <nonce>`` (plus what it restored); the grader checks that line
(``course_lib.grading.AuditGuards``) and removes the guard cells before scores are saved, so they
appear neither in the autograded notebook nor in feedback. The guard cannot make a hostile
submission harmless by itself (the interpreter is the submission's), which is why the sandbox keeps
grading data out of reach and ``tools/course.py`` also scans submissions for tampering constructs.
"""

from __future__ import annotations

import inspect
import textwrap

GUARD_MARK = "# [grading guard]"


def _course_guard(nonce, lib_roots, imports):
    import ast as _ast
    import asyncio as _asyncio
    import builtins as _builtins
    import importlib as _importlib
    import sys as _sys
    import threading as _threading
    import types as _types

    ip = get_ipython()  # noqa: F821 - provided by IPython
    roots = tuple(lib_roots) + tuple({_sys.prefix, _sys.base_prefix, _sys.exec_prefix})
    restored, problems = [], []

    def _library_file(fn):
        return fn.startswith(roots) or (fn.startswith("<") and not fn.startswith("<ipython-input"))

    def _library(obj):
        """True for C functions and Python code that lives in the installed libraries."""
        obj = getattr(obj, "__func__", obj)
        code = getattr(obj, "__code__", None)
        if isinstance(obj, (_types.FunctionType, _types.LambdaType)) and code is not None:
            return _library_file(code.co_filename)
        if isinstance(obj, type):
            return obj.__module__ != "__main__"
        if isinstance(obj, (_types.BuiltinFunctionType, _types.MethodWrapperType, _types.WrapperDescriptorType)):
            return True
        if isinstance(obj, _types.MethodType):
            return _library(obj.__func__)
        if callable(obj) and not isinstance(obj, type):
            call = type(obj).__dict__.get("__call__") or getattr(type(obj), "__call__", None)  # noqa: B004
            code = getattr(call, "__code__", None)
            return code is None or _library_file(code.co_filename)
        return True

    def _library_obj(obj):
        """Functions and classes by their code; any other object by its class."""
        if isinstance(obj, (type, _types.FunctionType, _types.MethodType, _types.BuiltinFunctionType)):
            return _library(obj)
        return _library(type(obj)) and _library(obj)

    def _foreign(mapping):
        return sorted(k for k, v in list(mapping.items()) if callable(v) and not _library(v))

    # 1. builtins, torch, NumPy, the standard library the tests use: can't be restored, only refused
    checked = {"builtins": vars(_builtins)}
    for name in ("torch", "torch.nn", "torch.nn.functional", "torch.testing", "torch.linalg", "numpy", "math",
                 "operator", "functools", "importlib", "types", "os", "io", "json", "random"):
        mod = _sys.modules.get(name)
        if mod is None:
            continue
        if not isinstance(mod, _types.ModuleType) or not _library_file(getattr(mod, "__file__", None) or "<builtin>"):
            problems.append(f"sys.modules[{name!r}] was replaced")
            continue
        checked[name] = vars(mod)
    torch = _sys.modules.get("torch")
    if isinstance(torch, _types.ModuleType):
        for cls_name in ("Tensor", "nn.Module"):
            cls = torch
            for part in cls_name.split("."):
                cls = getattr(cls, part, None)
            if isinstance(cls, type):
                checked[f"torch.{cls_name}"] = dict(vars(cls))
    for label, mapping in checked.items():
        for k in _foreign(mapping):
            problems.append(f"{label}.{k} was replaced by code from the submission")

    # 2. the kernel and IPython machinery (instances and their classes)
    kernel = getattr(ip, "kernel", None)
    objs = {"shell": ip, "kernel": kernel, "session": getattr(kernel, "session", None), "displayhook": ip.displayhook,
            "display_pub": ip.display_pub, "compile": ip.compile, "events": ip.events, "stdout": _sys.stdout,
            "stderr": _sys.stderr, "input_transformer_manager": ip.input_transformer_manager}
    for label, obj in objs.items():
        if obj is None:
            continue
        if not _library(type(obj)) or not _library_file(getattr(_sys.modules.get(type(obj).__module__), "__file__", "") or "<>"):
            problems.append(f"{label} is an object of the submission's class {type(obj).__name__}")
            continue
        inst = getattr(obj, "__dict__", {})
        for k in _foreign(inst):
            if label == "shell":  # instance attributes shadowing IPython's methods: remove
                delattr(obj, k)
                restored.append(f"IPython shell method {k}")
            else:
                problems.append(f"{label}.{k} was replaced by code from the submission")
        for cls in type(obj).__mro__:
            for k in _foreign(dict(vars(cls))):
                problems.append(f"{cls.__name__}.{k} (class of {label}) was replaced by code from the submission")
    handlers = getattr(kernel, "shell_handlers", {}) or {}
    for k in _foreign(handlers):
        problems.append(f"kernel message handler {k} was replaced")

    # 3. IPython hooks: remove what the submission added
    mgr = ip.input_transformer_manager
    for label, lst in (("input transformer", ip.input_transformers_post), ("cleanup transform", mgr.cleanup_transforms),
                       ("line transform", mgr.line_transforms), ("token transformer", mgr.token_transformers),
                       ("AST transformer", ip.ast_transformers)):
        bad = [t for t in lst if not _library_obj(t)]
        for t in bad:
            lst.remove(t)
            restored.append(f"{label} {getattr(t, '__name__', type(t).__name__)}")
    if ip.custom_exceptions:
        ip.set_custom_exc((), None)
        restored.append("custom exception handler")
    for event, callbacks in ip.events.callbacks.items():
        for cb in [cb for cb in callbacks if not _library(cb)]:
            callbacks.remove(cb)
            restored.append(f"{event} callback {getattr(cb, '__name__', '?')}")
    if _sys.displayhook is not ip.displayhook:
        _sys.displayhook = ip.displayhook
        restored.append("sys.displayhook")
    for getter, setter, label in ((_sys.gettrace, _sys.settrace, "trace function"),
                                  (_sys.getprofile, _sys.setprofile, "profile function")):
        fn = getter()
        if fn is not None and not _library(fn):
            setter(None)
            restored.append(label)
    for label, lst in (("import hook", _sys.meta_path), ("path hook", _sys.path_hooks)):
        for h in [h for h in lst if not _library_obj(h)]:
            lst.remove(h)
            restored.append(f"{label} {getattr(h, '__name__', type(h).__name__)}")

    # 4. threads and event-loop tasks the submission left running
    for t in _threading.enumerate():
        if t is _threading.main_thread():
            continue
        target = getattr(t, "_target", None) or type(t).run
        if not _library(target):
            problems.append(f"a background thread started by the submission is still running ({t.name})")
    try:
        loop = _asyncio.get_event_loop()
        tasks = _asyncio.all_tasks(loop)
    except RuntimeError:
        tasks = set()
    for task in tasks:
        coro = task.get_coro()
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        if code is not None and not _library_file(code.co_filename):
            problems.append("an asyncio task started by the submission is still scheduled")

    # 5. course_lib: reload every module whose functions no longer match their source file
    def _expected_code(path):
        tree = _ast.parse(open(path, encoding="utf-8").read(), path)
        want = {}

        def plain(node):
            return isinstance(node, (_ast.FunctionDef, _ast.AsyncFunctionDef)) and not node.decorator_list

        for node in tree.body:
            if plain(node):
                want[node.name] = (None, node.name)
            elif isinstance(node, _ast.ClassDef) and not node.decorator_list:
                for sub in node.body:
                    if plain(sub):
                        want[f"{node.name}.{sub.name}"] = (node.name, sub.name)
        code = compile(tree, path, "exec", dont_inherit=True)
        codes = {}

        def walk(co):
            for c in co.co_consts:
                if isinstance(c, _types.CodeType):
                    codes[c.co_qualname] = c
                    walk(c)

        walk(code)
        return want, codes

    for name in sorted(n for n in list(_sys.modules) if n == "course_lib" or n.startswith("course_lib.")):
        mod = _sys.modules[name]
        path = getattr(mod, "__file__", None) or ""
        if not isinstance(mod, _types.ModuleType) or not path.startswith(tuple(lib_roots)):
            del _sys.modules[name]
            restored.append(f"module {name} (a stand-in was registered)")
            continue
        if name == "course_lib.guard":
            continue
        want, codes = _expected_code(path)
        tampered = False
        for qual, (cls, attr) in want.items():
            holder = getattr(mod, cls, None) if cls else mod
            live = (vars(holder).get(attr) if isinstance(holder, type) else getattr(holder, attr, None)) if holder is not None else None
            fn = getattr(live, "__func__", live)
            for _ in range(5):  # decorators applied by libraries (functools.wraps) keep the original
                code = getattr(fn, "__code__", None)
                if code is not None and code.co_filename == path or not hasattr(fn, "__wrapped__"):
                    break
                fn = fn.__wrapped__
            code = getattr(fn, "__code__", None)
            ref = codes.get(qual)
            if ref is None or code is None or code.co_filename != path or code.co_code != ref.co_code \
                    or code.co_consts != ref.co_consts or code.co_names != ref.co_names:
                tampered = True
                break
        if not tampered:
            tampered = bool(_foreign(vars(mod)))
        if tampered:
            _importlib.reload(mod)
            restored.append(f"course_lib helpers in {name}")

    # 6. the names the course's locked cells imported (torch, F, np, ...)
    if imports:
        bound = []
        for node in _ast.parse(imports).body:
            for alias in node.names:
                bound.append(alias.asname or (alias.name.split(".")[0] if isinstance(node, _ast.Import) else alias.name))
        before = {n: ip.user_ns.get(n) for n in bound}
        exec(compile(imports, "<grading guard imports>", "exec", dont_inherit=True), ip.user_ns)
        for n in bound:
            if before[n] is not None and before[n] is not ip.user_ns.get(n):
                restored.append(f"name {n} (rebound by the submission)")

    if problems:
        raise RuntimeError("GradingIntegrityError: " + "; ".join(sorted(set(problems))))
    print(f"[grading guard] ok {nonce}" + (" | restored: " + "; ".join(restored) if restored else ""))


def guard_source(nonce: str, lib_roots: list[str], imports: str) -> str:
    """Source of one guard cell: the guard function inlined (it must not be importable, hence patchable)."""
    body = textwrap.dedent(inspect.getsource(_course_guard))
    return (
        f"{GUARD_MARK} added by the grader before a graded test; removed before scores are saved\n"
        f"{body}\n"
        f"_course_guard({nonce!r}, {tuple(lib_roots)!r}, {imports!r})\n"
        "del _course_guard\n"
    )
