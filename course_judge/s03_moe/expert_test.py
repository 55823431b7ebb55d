"""Exercise 3.1 (test): ``test_expert(expert_cls)``, judged by the expert classes it passes and the ones it catches.

The classes are built on the judge's side by ``course_lib.expert_drafts.make_expert`` from plain switches; the
learner's test gets stand-ins whose forward the judge computes (``course_judge.drafts``), in a shuffled order.
The catching part counts only while the test passes every correct class.
"""

from __future__ import annotations

from course_judge import drafts
from course_judge.drafts import Drafts
from course_judge.local import Alternative, Mutant
from course_judge.s03_moe._common import EXPERT_DRAFTS

GRADE_ID = "test_03_1_expert_test"
POINTS = 2
ANSWERS = ("ex_03_1_expert_test",)
SUMMARY = ("test_expert passes correct experts written differently (SiLU as z * sigmoid(z), w1 and w3 fused, einsum, "
           "float64 inside) and catches wrong ones (another activation, SiLU on the up branch or on both, a sum for "
           "the product, no up projection, w2 skipped, biases, the dtype or the leading dimensions lost)")
REFERENCE = ()
# The drafts' factory: a test that uses it as its oracle tests nothing itself.
FORBIDDEN_NAMES = drafts.forbidden(*EXPERT_DRAFTS)

CORRECT = {
    "the SwiGLU with F.silu": {},
    "SiLU written as z * sigmoid(z)": dict(style="sigmoid"),
    "w1 and w3 fused into one product, then split": dict(style="fused"),
    "einsum on the weights": dict(style="einsum"),
    "computed in float64 inside, cast back to x's dtype": dict(compute="float64"),
}
_VALUES = "compare with the formula computed from the expert's own weights"
_SIGN = "use inputs large enough, of both signs, that the activation's shape matters (SiLU is negative below 0)"
VISIBLE_WRONG = {"ReLU instead of SiLU": (dict(act="relu"), _SIGN)}
WRONG = {
    "GELU instead of SiLU": (dict(act="gelu"), _SIGN),
    "sigmoid instead of SiLU": (dict(act="sigmoid"), _VALUES),
    "no activation (w1 x * w3 x)": (dict(act="none"), _VALUES),
    "SiLU on the up branch: w1 and w3 trade roles": (dict(hidden="swapped"), "compute the formula with w1 as the gate, w3 as up"),
    "SiLU on both branches": (dict(hidden="both"), _VALUES),
    "SiLU of the product": (dict(hidden="of_product"), _VALUES),
    "a sum instead of the product": (dict(hidden="sum"), _VALUES),
    "the up projection is ignored (no product)": (dict(hidden="gate_only"), _VALUES),
    "w2 skipped: the output is inter_dim wide": (dict(down=False), "use inter_dim != dim and check the output's shape"),
    "biases in w1, w2, w3": (dict(bias=True), "check the parameters (no biases), or the output of a zero input"),
    "float64 output for a float32 input": (dict(compute="float64", cast_back=False), "check the output's dtype"),
    "leading dimensions flattened: (B, T, dim) -> (B*T, dim)": (dict(keep_shape=False),
                                                                  "use a (B, T, dim) input and check the output's shape"),
}
DRAFTS = Drafts("course_lib.expert_drafts:make_expert", "test_expert", CORRECT, {**VISIBLE_WRONG, **WRONG},
                noun="expert")
_CAUSE = ("compare with the formula within a tolerance (correct experts round differently), from the expert's own "
          "weights, and check only what the contract says (parameter names, shapes, dtype)")


def judge(k, t):
    results: dict = {}
    with t.part("visible checks: test_expert passes a correct expert and catches ReLU instead of SiLU", 0.5):
        results.update(drafts.run(k, DRAFTS))
        drafts.accepts(results, ["the SwiGLU with F.silu"], DRAFTS, _CAUSE)
        drafts.catches(results, list(VISIBLE_WRONG), DRAFTS)
    accepted = False
    with t.part("test_expert passes correct experts written differently (z * sigmoid(z), fused w1|w3, einsum, "
                "float64 inside)", 0.5):
        if not results:
            raise AssertionError("not graded: the experts could not be run through your test")
        drafts.accepts(results, list(CORRECT), DRAFTS, _CAUSE)
        accepted = True
    with t.part("test_expert catches wrong experts: activations, branches, the product, w2, biases, dtype, shape", 1):
        if not accepted:
            raise AssertionError("not graded: your test must pass every correct expert before catching wrong ones counts")
        drafts.catches(results, list(WRONG), DRAFTS)


MUTANTS = [
    Mutant("dtype not checked (the output cast to float32)", "assert y.shape == x.shape and y.dtype == x.dtype,",
           "y = y.float()\n            assert y.shape == x.shape,", expect="float64 output for a float32 input"),
    Mutant("inputs near zero", "x = 3 * torch.randn(*shape, generator=g)", "x = 1e-3 * torch.randn(*shape, generator=g)",
           expect="passes a wrong expert"),
    Mutant("the oracle puts SiLU on w3", "gate, up = x @ w1.T, x @ w3.T", "up, gate = x @ w1.T, x @ w3.T",
           expect="rejects a correct expert"),
    Mutant("exact comparison", "torch.allclose(y, want, atol=1e-5, rtol=1e-4)", "torch.equal(y, want)",
           expect="rejects a correct expert"),
    Mutant("2-D inputs only", "for shape in ((7, dim), (2, 3, dim)):", "for shape in ((7, dim),):",
           expect="leading dimensions flattened"),
    Mutant("always raises", "    g = torch.Generator().manual_seed(0)\n",
           "    raise AssertionError('no')\n", expect="rejects a correct expert"),
    Mutant("not written", "    ### BEGIN SOLUTION\n", "    ### BEGIN SOLUTION\n    raise NotImplementedError\n",
           expect="not implemented"),
]

ALTERNATIVES = [
    Alternative("float64 weights loaded by the test, an elementwise SiLU, a count of parameters", source='''
def test_expert(expert_cls) -> None:
    """A float64 oracle on weights the test draws itself."""
    ### BEGIN SOLUTION
    g = torch.Generator().manual_seed(5)
    for dim, inter in ((6, 10), (9, 3)):
        e = expert_cls(dim, inter)
        assert sum(p.numel() for p in e.parameters()) == 3 * dim * inter, "three matrices and no biases"
        w1, w3 = torch.randn(inter, dim, generator=g), torch.randn(inter, dim, generator=g)
        w2 = torch.randn(dim, inter, generator=g)
        e.load_state_dict({"w1.weight": w1, "w2.weight": w2, "w3.weight": w3})
        x = 2 * torch.randn(3, 4, dim, generator=g)
        y = e(x).detach()
        assert tuple(y.shape) == (3, 4, dim) and y.dtype == torch.float32, (tuple(y.shape), y.dtype)
        a = torch.einsum("btd,id->bti", x.double(), w1.double())
        h = a / (1 + torch.exp(-a)) * torch.einsum("btd,id->bti", x.double(), w3.double())
        want = torch.einsum("bti,di->btd", h, w2.double())
        assert (y.double() - want).abs().max() <= 1e-4 * (1 + want.abs().max()), "not w2(silu(w1 x) * w3 x)"
    ### END SOLUTION
'''),
]
