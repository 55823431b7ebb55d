"""Exercise 1.1 (KV cache): bytes needed to cache keys and values, and a test that pins the formula down.

The drafts the learner's ``test_kv_cache_bytes`` is run on are built on the judge's side from plain switches
(``course_lib.kv_drafts``) and called from the kernel through stand-ins (``course_judge.drafts``).
The test earns the catching part only while it passes every correct draft.
"""

from __future__ import annotations

from course_judge import drafts
from course_judge.checks import expect_equal, expect_int
from course_judge.drafts import Drafts
from course_judge.local import Alternative, Mutant

GRADE_ID = "test_01_1_kv_cache"
POINTS = 2
ANSWERS = ("ex_01_1_kv_cache",)
SUMMARY = ("kv_cache_bytes: the factor 2 for K and V, every argument, the defaults (batch 1, bf16); test_kv_cache_bytes: "
           "passes correct drafts written differently, catches wrong ones (a factor left out, a default changed, bits for "
           "bytes, a float, an extra token, layers for heads)")
REFERENCE = ()
# The drafts' factory: a test that uses it as its oracle tests nothing itself.
FORBIDDEN_NAMES = drafts.forbidden("make_kv_cache_bytes")

CORRECT = {
    "the formula as one product": {},
    "math.prod over the factors": dict(style="prod"),
    "a loop adding one layer at a time": dict(style="loop"),
    "a float product converted to int (exact at these sizes)": dict(style="float"),
}
VISIBLE_WRONG = {"the batch is ignored": (dict(use_batch=False), "call it with a batch other than 1")}
WRONG = {
    "the factor 2 (K and V) is missing": (dict(factor=1), "compare with the formula at sizes other than 1"),
    "the default batch is 2": (dict(default_batch=2), "call it once without batch and bytes_per_elem"),
    "the default is 4 bytes per element (fp32), not 2 (bf16)": (dict(default_bytes=4), "call it once without bytes_per_elem"),
    "bits instead of bytes (x8)": (dict(bits=True), "compare with the formula's value, not only with other calls of fn"),
    "a float instead of an int": (dict(as_float=True), "check the type of the result: the contract says int"),
    "one token too many (seq_len + 1)": (dict(extra_tokens=1), "compare exact values at a few sizes"),
    "n_layers used where n_kv_heads belongs": (dict(layers_for_heads=True), "use different numbers of layers and heads"),
}


def _want(L, H, D, T, B=1, e=2):
    return 2 * L * H * D * T * B * e


def _diagnose(got, args):
    L, H, D, T, B, e = args
    full = _want(*args)
    if got == full // 2:
        return "the factor 2 is missing: the cache holds a key AND a value per head and token"
    if got == full * 8:
        return "bits instead of bytes: bytes_per_elem is already in bytes"
    for name, value in (("layers", L), ("kv heads", H), ("head dim", D), ("tokens", T), ("batch", B), ("bytes per element", e)):
        if value > 1 and got * value == full:
            return f"the number of {name} is left out of the product"
    return "2 (K and V) x layers x kv heads x head dim x tokens x batch x bytes per element"


DRAFTS = Drafts("course_lib.kv_drafts:make_kv_cache_bytes", "test_kv_cache_bytes", CORRECT,
                {**VISIBLE_WRONG, **WRONG})
_CAUSE = "compare values with the formula (exactly: they are ints), not the way a draft computes them"


def judge(k, t):
    f = k.g.kv_cache_bytes
    with t.part("visible checks: one layer, head and token; a small product", 0.25):
        for args in [(1, 1, 1, 1, 1, 1), (2, 4, 8, 10, 1, 2)]:
            got = expect_int(f(*args), f"kv_cache_bytes{args}")
            expect_equal(got, _want(*args), f"kv_cache_bytes{args}", hint=_diagnose(got, args))
    with t.part("kv_cache_bytes: DeepSeek-V3-sized, GQA-sized and odd sizes", 0.25):
        for args in [(61, 128, 128, 1, 1, 2), (32, 8, 128, 4096, 4, 2), (3, 5, 7, 11, 13, 1), (2, 3, 5, 7, 1, 4)]:
            got = expect_int(f(*args), f"kv_cache_bytes{args}")
            expect_equal(got, _want(*args), f"kv_cache_bytes{args}", hint=_diagnose(got, args))
    with t.part("kv_cache_bytes: defaults batch=1, bytes_per_elem=2 (bf16)", 0.25):
        got = expect_int(f(61, 128, 128, 1), "kv_cache_bytes(61, 128, 128, 1)")
        expect_equal(got, _want(61, 128, 128, 1), "kv_cache_bytes(61, 128, 128, 1) with the default batch and bf16",
                     hint="the defaults are batch=1 and bytes_per_elem=2")
        got = expect_int(f(4, 2, 16, 100, bytes_per_elem=4), "kv_cache_bytes(4, 2, 16, 100, bytes_per_elem=4)")
        expect_equal(got, _want(4, 2, 16, 100, 1, 4), "kv_cache_bytes with bytes_per_elem=4 given by name",
                     hint="keep the parameter names of the signature")
    results: dict = {}
    with t.part("visible checks: test_kv_cache_bytes passes the formula and catches a draft that ignores the batch", 0.25):
        results.update(drafts.run(k, DRAFTS))
        drafts.accepts(results, ["the formula as one product"], DRAFTS, _CAUSE)
        drafts.catches(results, list(VISIBLE_WRONG), DRAFTS)
    accepted = False
    with t.part("test_kv_cache_bytes passes correct drafts written differently (math.prod, a loop, a float product)", 0.25):
        if not results:
            raise AssertionError("not graded: the drafts could not be run through your test")
        drafts.accepts(results, list(CORRECT), DRAFTS, _CAUSE)
        accepted = True
    with t.part("test_kv_cache_bytes catches wrong drafts: a factor left out, a default changed, bits, a float, an extra "
                "token, layers for heads", 0.75):
        if not accepted:
            raise AssertionError("not graded: your test must pass every correct draft before catching wrong ones counts")
        drafts.catches(results, list(WRONG), DRAFTS)


MUTANTS = [
    Mutant("no factor 2", "return 2 * n_layers", "return n_layers", expect="factor 2 is missing"),
    Mutant("layers left out", "2 * n_layers * n_kv_heads", "2 * n_kv_heads", expect="layers is left out"),
    Mutant("batch left out", "seq_len * batch * bytes_per_elem", "seq_len * bytes_per_elem", expect="batch is left out"),
    Mutant("head dim left out", "n_kv_heads * head_dim * seq_len", "n_kv_heads * seq_len", expect="head dim is left out"),
    Mutant("bits not bytes", "* batch * bytes_per_elem", "* batch * bytes_per_elem * 8", expect="bits instead of bytes"),
    Mutant("float result", "return 2 * n_layers", "return 2.0 * n_layers", expect="should be an int"),
    Mutant("default fp32", "batch=1, bytes_per_elem=2)", "batch=1, bytes_per_elem=4)", expect="defaults are batch=1"),
    Mutant("test: only ones", "[(1, 1, 1, 1, 1, 1), (3, 5, 7, 11, 13, 4), (61, 128, 128, 4096, 2, 2)]", "[(1, 1, 1, 1, 1, 1)]",
           expect="passes a wrong draft"),
    Mutant("test: no type check", "        assert isinstance(got, int),", "        assert True or isinstance(got, int),",
           expect="a float instead of an int"),
    Mutant("test: defaults not checked", "    assert fn(3, 5, 7, 11) ==", "    assert True or fn(3, 5, 7, 11) ==",
           expect="default"),
    Mutant("test: batch always 1", "(3, 5, 7, 11, 13, 4), (61, 128, 128, 4096, 2, 2)",
           "(3, 5, 7, 11, 1, 4), (61, 128, 128, 4096, 1, 2)", expect="the batch is ignored"),
    Mutant("test: always raises", "    for args in [(1, 1, 1, 1, 1, 1)",
           "    raise AssertionError('no')\n    for args in [(1, 1, 1, 1, 1, 1)", expect="rejects a correct draft"),
    Mutant("test: the oracle forgets K or V", "got, want = fn(*args), 2 * math.prod(args)", "got, want = fn(*args), math.prod(args)",
           expect="rejects a correct draft"),
]

ALTERNATIVES = [
    Alternative("math.prod; a test that doubles one factor at a time", source='''
def kv_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, batch=1, bytes_per_elem=2):
    ### BEGIN SOLUTION
    per_token_layer = 2 * n_kv_heads * head_dim  # K and V
    return math.prod([per_token_layer, n_layers, seq_len, batch, bytes_per_elem])
    ### END SOLUTION


def test_kv_cache_bytes(fn):
    ### BEGIN SOLUTION
    base = [2, 3, 5, 7, 11, 2]
    ref = fn(*base)
    assert type(ref) is int, "not an int"
    assert ref == 2 * 2 * 3 * 5 * 7 * 11 * 2, ref
    for i in range(6):  # doubling any one factor doubles the bytes
        args = list(base)
        args[i] *= 2
        assert fn(*args) == 2 * ref, f"factor {i} is not linear"
    assert fn(2, 3, 5, 7) * 11 == ref, "defaults"
    ### END SOLUTION
'''),
]
