"""Exercise 1.1 (KV cache): bytes needed to cache keys and values."""

from __future__ import annotations

from course_judge.checks import expect_equal, expect_int
from course_judge.local import Alternative, Mutant

GRADE_ID = "test_01_1_kv_cache"
POINTS = 3
ANSWERS = ("ex_01_1_kv_cache",)
SUMMARY = "the factor 2 for K and V, every argument, the defaults (batch 1, bf16)"
REFERENCE = ()


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


def judge(k, t):
    f = k.g.kv_cache_bytes
    with t.part("visible checks: one layer, head and token; a small product", 1):
        for args in [(1, 1, 1, 1, 1, 1), (2, 4, 8, 10, 1, 2)]:
            got = expect_int(f(*args), f"kv_cache_bytes{args}")
            expect_equal(got, _want(*args), f"kv_cache_bytes{args}", hint=_diagnose(got, args))
    with t.part("DeepSeek-V3-sized, GQA-sized and odd sizes", 1):
        for args in [(61, 128, 128, 1, 1, 2), (32, 8, 128, 4096, 4, 2), (3, 5, 7, 11, 13, 1), (2, 3, 5, 7, 1, 4)]:
            got = expect_int(f(*args), f"kv_cache_bytes{args}")
            expect_equal(got, _want(*args), f"kv_cache_bytes{args}", hint=_diagnose(got, args))
    with t.part("defaults: batch=1, bytes_per_elem=2 (bf16)", 1):
        got = expect_int(f(61, 128, 128, 1), "kv_cache_bytes(61, 128, 128, 1)")
        expect_equal(got, _want(61, 128, 128, 1), "kv_cache_bytes(61, 128, 128, 1) with the default batch and bf16",
                     hint="the defaults are batch=1 and bytes_per_elem=2")
        got = expect_int(f(4, 2, 16, 100, bytes_per_elem=4), "kv_cache_bytes(4, 2, 16, 100, bytes_per_elem=4)")
        expect_equal(got, _want(4, 2, 16, 100, 1, 4), "kv_cache_bytes with bytes_per_elem=4 given by name",
                     hint="keep the parameter names of the signature")


MUTANTS = [
    Mutant("no factor 2", "return 2 * n_layers", "return n_layers", expect="factor 2 is missing"),
    Mutant("layers left out", "2 * n_layers * n_kv_heads", "2 * n_kv_heads", expect="layers is left out"),
    Mutant("batch left out", "seq_len * batch * bytes_per_elem", "seq_len * bytes_per_elem", expect="batch is left out"),
    Mutant("head dim left out", "n_kv_heads * head_dim * seq_len", "n_kv_heads * seq_len", expect="head dim is left out"),
    Mutant("bits not bytes", "* bytes_per_elem", "* bytes_per_elem * 8", expect="bits instead of bytes"),
    Mutant("float result", "return 2 * n_layers", "return 2.0 * n_layers", expect="should be an int"),
    Mutant("default fp32", "batch=1, bytes_per_elem=2)", "batch=1, bytes_per_elem=4)", expect="defaults are batch=1"),
]

ALTERNATIVES = [
    Alternative("math.prod", source='''
def kv_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, batch=1, bytes_per_elem=2):
    per_token_layer = 2 * n_kv_heads * head_dim  # K and V
    return math.prod([per_token_layer, n_layers, seq_len, batch, bytes_per_elem])
'''),
]
