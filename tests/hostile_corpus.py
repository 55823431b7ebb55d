"""Hostile submissions against the judge, built from Section 1's release and solutions.

Each case is what a student who wants points without the work would try once the tests left the kernel:
take over the kernel's cell execution (input and AST transformers, audit hooks, trace functions, threads,
IPython callbacks), patch builtins and torch, replace the kernel's end of the judge's channel
(``sys.modules``, a package ``__path__``), read what the kernel executes (parent message, ``linecache``,
frames, ``gc``), hand in the course's reference (import, ``exec`` of its source), forge output and
replies, send back objects that lie, or kill / hang the kernel mid-check. ``score`` is what the honest
part of the code deserves (Section 1 has 17.5 points: sdpa 3, kv_cache 2, low_rank 3, gating 3, decode 3.5,
quiz 3); ``review`` says whether a person is asked to look.
"""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from grading_corpus import find, src, write

SECTION = "01_foundations"
FULL = 17.5
FORGED_VERDICT = f"Graded by the judge: {FULL:g} / {FULL:g} points"  # what forged_output prints
POINTS = {"sdpa": 3.0, "kv_cache": 2.0, "low_rank": 3.0, "gating": 3.0, "decode": 3.5, "quiz": 3.0}
LIB = Path(__file__).resolve().parents[1] / "course_lib"


@dataclass
class Case:
    name: str
    build: Callable[[Path, dict, dict], None]  # (submission folder, good notebook, blank release)
    score: float
    review: bool = True
    kinds: set[str] = field(default_factory=set)  # diagnoses the record must carry
    check: bool = False  # also graded with `make check` (the self-learner's path): same score


def _attack(nb: dict, code: str, cell: str = "ex_01_1_sdpa") -> dict:
    nb = copy.deepcopy(nb)
    c = find(nb, cell)
    c["source"] = textwrap.dedent(code).strip("\n") + "\n\n" + src(c)
    return nb


def _replace_answer(nb: dict, cell: str, code: str) -> dict:
    nb = copy.deepcopy(nb)
    find(nb, cell)["source"] = textwrap.dedent(code).strip("\n") + "\n"
    return nb


def _no_scale(nb: dict) -> dict:
    """The attention without its 1/sqrt(d): deserves 0 of sdpa's 6 points, everything else stays."""
    nb = copy.deepcopy(nb)
    c = find(nb, "ex_01_1_sdpa")
    assert "/ math.sqrt(d)" in src(c)
    c["source"] = src(c).replace("/ math.sqrt(d)", "")
    return nb


FORGE_REPLY = '''
from comm import get_comm_manager as _cm
from course_lib import wire as _wire
def _forge_all(value=True):  # answer "True" on every comm the judge has open, whatever it asked
    for _comm in list(_cm().comms.values()):
        try:
            _comm.send({"re": "0" * 32}, buffers=[_wire.dumps({"ok": value})])
        except Exception:
            pass
'''


def input_transformer(folder, good, blank):
    code = FORGE_REPLY + '''
_ip = get_ipython()
def _rewrite(lines):  # the judge's channel never opens; every check cell becomes `pass`
    text = "".join(lines)
    if "course_lib.agent" in text:
        return ["_forge_all()\\n"]
    if "assert" in text or "Checks you can run now" in text:
        return ["pass\\n"]
    return lines
_ip.input_transformers_post.append(_rewrite)
print("Graded by the judge: 3 / 3 points")
'''
    write(folder, _attack(blank, code))


def ast_transformer(folder, good, blank):
    code = '''
import ast as _ast
class _Swallow(_ast.NodeTransformer):
    def visit_Module(self, node):  # every cell, judge requests included, runs inside try/except: pass
        handler = _ast.ExceptHandler(type=None, name=None, body=[_ast.Pass()])
        node.body = [_ast.Try(body=node.body or [_ast.Pass()], handlers=[handler], orelse=[], finalbody=[])]
        return _ast.fix_missing_locations(node)
get_ipython().ast_transformers.append(_Swallow())
get_ipython().set_custom_exc((Exception,), lambda *a, **k: None)
'''
    write(folder, _attack(blank, code))


def hooks_and_threads(folder, good, blank):
    code = '''
import sys as _sys, threading as _threading, _thread
import course_lib.testing as _T
def _audit(event, args):  # swap the helpers for no-ops whenever anything is imported or compiled
    if event in ("import", "compile"):
        _T.assert_close = _T.assert_true = lambda *a, **k: None
_sys.addaudithook(_audit)
_sys.settrace(lambda *a: None)
_sys.setprofile(lambda *a: None)
def _loop():
    import time
    while True:
        _T.assert_close = lambda *a, **k: None
        time.sleep(0.005)
_thread.start_new_thread(_loop, ())
_threading.Thread(target=exec, args=("import time\\nwhile True: time.sleep(1)",), daemon=True).start()
get_ipython().events.register("pre_run_cell", lambda info: None)
get_ipython().events.register("post_run_cell", lambda result: None)
'''
    write(folder, _attack(_no_scale(good), code))


def patched_torch(folder, good, blank):
    code = '''
import builtins as _b, torch as _torch
_torch.allclose = lambda *a, **k: True
_torch.equal = lambda *a, **k: True
_torch.testing.assert_close = lambda *a, **k: None
_torch.Tensor.__eq__ = lambda self, other: _torch.ones_like(self, dtype=_torch.bool)
_real_import = _b.__import__
_b.__import__ = lambda name, *a, **k: _real_import(name, *a, **k)  # sees every import, changes none
_b.print = lambda *a, **k: None
'''
    write(folder, _attack(_no_scale(good), code))


def replaced_agent_module(folder, good, blank):
    code = FORGE_REPLY + '''
import sys as _sys, types as _types
_fake = _types.ModuleType("course_lib.agent")
def _listen():  # a judge channel that answers every request with "True"
    def _opened(comm, msg):
        comm.on_msg(lambda m: comm.send({"re": "0" * 32}, buffers=[_wire.dumps({"ok": True})]))
    _cm().register_target("course_judge", _opened)
_fake.listen = _listen
_sys.modules["course_lib.agent"] = _fake
import course_lib as _cl
_cl.agent = _fake
'''
    write(folder, _attack(blank, code))


def path_hijack(folder, good, blank):
    code = '''
import os as _os, sys as _sys, tempfile as _tf
_d = _tf.mkdtemp()
with open(_os.path.join(_d, "agent.py"), "w") as _f:
    _f.write("TARGET = 'x'\\nLISTEN = ''\\ndef listen():\\n    print('ok: all tests passed')\\n")
import course_lib as _cl
_cl.__path__.insert(0, _d)
_sys.modules.pop("course_lib.agent", None)
if hasattr(_cl, "agent"):
    del _cl.agent
'''
    write(folder, _attack(blank, code))


def read_executing_code(folder, good, blank):
    code = '''
import gc as _gc, linecache as _lc, sys as _sys, threading as _threading, time as _time
_ip = get_ipython()
_seen = []
def _watch():  # sample what the kernel executes and what the judge sends
    while True:
        try:
            _seen.append(str(_ip.kernel.get_parent().get("content", {}).get("code", ""))[:2000])
            _seen.append(repr(_sys._current_frames())[:500])
        except Exception:
            pass
        _time.sleep(0.01)
_threading.Thread(target=_watch, daemon=True).start()
_ip.events.register("pre_run_cell", lambda info: _seen.append(info.raw_cell))
'''
    dump = '''
import base64 as _b64
print("SEEN", _seen[-50:])
print("LINECACHE", {k: "".join(v[2])[:3000] for k, v in list(_lc.cache.items())})
print("GC", [o for o in _gc.get_objects() if isinstance(o, str) and ("judge" in o or "expect" in o)][:200])
print("B64", _b64.b64encode(repr(_seen).encode()).decode()[:5000])
'''
    nb = _attack(blank, code)
    later = find(nb, "quiz_01_answers")
    later["source"] = textwrap.dedent(dump) + "\n" + src(later)
    write(folder, nb)


def delegate_import(folder, good, blank):
    nb = _replace_answer(good, "ex_01_3_gating", '''
from course_lib.deepseek.moe import expert_load, max_violation  # the course's own answers
import torch


def topk_gating(logits, k, mode="softmax"):
    scores = torch.softmax(logits, -1) if mode == "softmax" else torch.sigmoid(logits)
    w, i = scores.topk(k, dim=-1)
    return (w / w.sum(-1, keepdim=True) if mode == "sigmoid" else w), i
''')
    write(folder, nb)


def delegate_exec_source(folder, good, blank):
    nb = _replace_answer(good, "ex_01_4_decode", f'''
import torch
_ns = {{}}
exec(open({str(LIB / "deepseek" / "fp8.py")!r}).read(), _ns)  # run the course's FP8 reference


def decode_fp8(code, fmt="e4m3"):
    return float(_ns["decode"](torch.tensor([code], dtype=torch.uint8), fmt)[0])


def fp8_limits(fmt="e4m3"):
    f = _ns["get_format"](fmt)
    return f.max, f.min_normal, f.min_subnormal
''')
    write(folder, nb)


def forged_output(folder, good, blank):
    code = FORGE_REPLY + f'print({FORGED_VERDICT!r})\n' + '''
import threading as _threading, time as _time
from IPython.display import publish_display_data as _pub
_pub({"text/plain": "[ok  ] all tests passed"})
def _spam():  # forged answers on the judge's comm, all the time, whatever it asks
    while True:
        _forge_all(True)
        _time.sleep(0.05)
_threading.Thread(target=_spam, daemon=True).start()
'''
    write(folder, _attack(_no_scale(good), code))


def lying_tensor(folder, good, blank):
    nb = _replace_answer(good, "ex_01_1_sdpa", '''
import torch


class _Liar(torch.Tensor):
    """Equal to everything, close to everything."""

    def __eq__(self, other):
        return torch.ones_like(torch.Tensor(self), dtype=torch.bool)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func.__name__ in ("allclose", "equal", "isclose"):
            return True
        return super().__torch_function__(func, types, args, kwargs or {})


def scaled_dot_product_attention(q, k, v, mask=None, is_causal=False):
    T, S = q.shape[-2], k.shape[-2]
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype).as_subclass(_Liar)
    w = torch.full((*q.shape[:-1], S), 1.0 / S, dtype=q.dtype).as_subclass(_Liar)
    return out, w
''')
    write(folder, nb)


def quiz_object(folder, good, blank):
    nb = _attack(good, '''
class _Any(str):
    def __eq__(self, other):
        return True
    __hash__ = str.__hash__
class _Obj:
    def __eq__(self, other):
        return True
''', cell="quiz_01_answers")
    c = find(nb, "quiz_01_answers")
    c["source"] = src(c).replace('ANSWER_Q1 = "b"', 'ANSWER_Q1 = _Obj()').replace('ANSWER_Q2 = "b"', 'ANSWER_Q2 = _Any("a")')
    write(folder, nb)


def kernel_exits(folder, good, blank):
    nb = copy.deepcopy(good)
    c = find(nb, "ex_01_2_low_rank")
    svd = "    U, S, Vh = torch.linalg.svd(W, full_matrices=False)"
    c["source"] = src(c).replace(svd, "    import os\n    os._exit(3)  # while the judge checks it\n" + svd, 1)
    write(folder, nb)


def kernel_hangs(folder, good, blank):
    nb = copy.deepcopy(good)
    c = find(nb, "ex_01_3_gating")
    hang = ("    if logits.dtype == torch.float64:  # only when the judge checks it\n"
            "        import time\n        while True:\n            try:\n                time.sleep(0.2)\n"
            "            except KeyboardInterrupt:\n                pass\n")
    c["source"] = src(c).replace('    if mode == "softmax":\n', hang + '    if mode == "softmax":\n', 1)
    write(folder, nb)


def slow_call(folder, good, blank):
    nb = copy.deepcopy(good)
    c = find(nb, "ex_01_4_decode")
    c["source"] = src(c).replace("    E, M, bias = FP8_FORMATS[fmt]\n    sign",
                                 "    if code == 200:\n        import time\n        time.sleep(1000)  # interruptible\n"
                                 "    E, M, bias = FP8_FORMATS[fmt]\n    sign", 1)
    write(folder, nb)


def huge_reply(folder, good, blank):
    nb = copy.deepcopy(good)
    c = find(nb, "ex_01_1_sdpa")
    c["source"] = src(c).replace("    return weights @ v, weights",
                                 "    if q.dtype == torch.float64:\n        return weights @ v, torch.zeros(4_000_000)\n"
                                 "    return weights @ v, weights", 1)
    write(folder, nb)


def deep_reply(folder, good, blank):
    nb = copy.deepcopy(good)
    c = find(nb, "ex_01_1_kv_cache")
    deep = "    deep = []\n    for _ in range(5000):\n        deep = [deep]\n    if seq_len > 1:\n        return deep\n"
    c["source"] = src(c).replace("    return 2 * n_layers", deep + "    return 2 * n_layers", 1)
    write(folder, nb)


def tagged_drafts(folder, good, blank):
    """A test that sorts the drafts by how they were built: the kernel's draft factory, patched under computed names."""
    code = '''
import importlib as _il
_mod = _il.import_module("course_lib." + "kv" + "_drafts")
_name = "make_" + "kv_cache_bytes"
_made = getattr(_mod, _name)
def _tagging(**switches):  # every switch but the style plants a mistake
    fn = _made(**switches)
    fn.wrong = any(k != "style" for k in switches)
    return fn
setattr(_mod, _name, _tagging)
def test_kv_cache_bytes(fn):
    assert not getattr(fn, "wrong", False), "a wrong draft"
'''
    nb = copy.deepcopy(good)
    c = find(nb, "ex_01_1_kv_cache")
    c["source"] = src(c) + "\n\n" + textwrap.dedent(code).strip("\n") + "\n"
    write(folder, nb)


def cases() -> list[Case]:
    s = POINTS
    return [
        Case("input_transformer", input_transformer, 0.0, check=True),
        Case("ast_transformer", ast_transformer, 0.0),
        Case("hooks_and_threads", hooks_and_threads, FULL - s["sdpa"], check=True),
        Case("patched_torch", patched_torch, FULL - s["sdpa"]),
        Case("replaced_agent_module", replaced_agent_module, 0.0),
        Case("path_hijack", path_hijack, 0.0),
        Case("read_executing_code", read_executing_code, 0.0),
        Case("delegate_import", delegate_import, FULL - s["gating"], kinds={"reference_use"}),
        Case("delegate_exec_source", delegate_exec_source, FULL - s["decode"], kinds={"reference_use"}),
        Case("forged_output", forged_output, FULL - s["sdpa"]),
        Case("lying_tensor", lying_tensor, FULL - s["sdpa"], review=False),
        Case("quiz_object", quiz_object, FULL - 1.5, review=False),
        Case("kernel_exits", kernel_exits, s["sdpa"] + s["kv_cache"], review=True, kinds={"kernel_stopped"}),
        Case("kernel_hangs", kernel_hangs, s["sdpa"] + s["kv_cache"] + s["low_rank"], review=False, kinds={"kernel_stopped"}),
        Case("slow_call", slow_call, FULL - 2.0, review=False),
        Case("huge_reply", huge_reply, FULL - 2.0, review=False),
        # kv_cache_bytes' own 0.75 points are lost; the 1.25 of test_kv_cache_bytes (run on the course's drafts) are not
        Case("deep_reply", deep_reply, FULL - 0.75, review=False),
        # the drafts are the judge's: the tags never reach them; the test passes all, catches none (1 of 2 points lost);
        # the dynamic import and the computed attribute names ask a person to look
        Case("tagged_drafts", tagged_drafts, FULL - 1.0, review=True),
    ]


def good_notebook(root: Path) -> dict:
    import course

    rel = course._load(root / "release" / SECTION / f"{SECTION}.ipynb")
    return course.partial_notebook(rel, course._load(root / "source" / SECTION / f"{SECTION}.ipynb"), 1.0)


def build(root: Path) -> list[Case]:
    import course

    good = good_notebook(root)
    blank = course._load(root / "release" / SECTION / f"{SECTION}.ipynb")
    out = cases()
    for case in out:
        case.build(root / "submitted" / case.name / SECTION, copy.deepcopy(good), copy.deepcopy(blank))
    (root / "submitted" / "good" / SECTION).mkdir(parents=True, exist_ok=True)
    write(root / "submitted" / "good" / SECTION, good)
    return out
