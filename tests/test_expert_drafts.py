"""course_lib.expert_drafts: the default draft is the course's SwiGLU (course_lib.deepseek.common.SwiGLU) on the
same weights; the correct variants agree with it within rounding; every wrong one differs in value, shape, dtype
or parameters; the judge's lists of drafts are the ones these cases cover."""

from __future__ import annotations

import pytest
import torch

from course_judge.s03_moe import expert_test
from course_lib.deepseek.common import SwiGLU
from course_lib.drafts import choice
from course_lib.expert_drafts import is_draft, make_expert


def _pair(spec: dict, dim: int = 8, inter: int = 5):
    torch.manual_seed(0)
    ref = SwiGLU(dim, inter)
    draft = make_expert(**spec)(dim, inter)
    draft.load_state_dict(ref.state_dict(), strict=False)  # biases, where a draft has them, keep their init
    return ref, draft


def _x(*shape):
    return 3 * torch.randn(*shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(expert_test.CORRECT))
def test_correct_drafts_agree_with_the_course_swiglu(name):
    ref, draft = _pair(expert_test.CORRECT[name])
    for x in (_x(7, 8), _x(2, 3, 8), _x(7, 8).double()):
        if x.dtype == torch.float64:
            ref, draft = ref.double(), draft.double()
        with torch.no_grad():
            y, want = draft(x), ref(x)
        assert y.shape == want.shape and y.dtype == want.dtype
        assert torch.allclose(y, want, atol=1e-5, rtol=1e-5), name
    assert sorted(n for n, _ in draft.named_parameters()) == ["w1.weight", "w2.weight", "w3.weight"]


def test_the_default_draft_is_exactly_the_course_swiglu():
    ref, draft = _pair({})
    with torch.no_grad():
        assert torch.equal(draft(_x(4, 8)), ref(_x(4, 8)))


@pytest.mark.parametrize("name", list(expert_test.VISIBLE_WRONG) + list(expert_test.WRONG))
def test_wrong_drafts_differ_from_the_course_swiglu(name):
    spec = {**expert_test.VISIBLE_WRONG, **expert_test.WRONG}[name][0]
    ref, draft = _pair(spec)
    x = _x(2, 3, 8)
    with torch.no_grad():
        y, want = draft(x), ref(x)
    params = sorted(n for n, _ in draft.named_parameters())
    same = y.shape == want.shape and y.dtype == want.dtype and torch.allclose(y, want, atol=1e-3)
    assert not same or params != ["w1.weight", "w2.weight", "w3.weight"], f"{name}: indistinguishable from the SwiGLU"


def test_drafts_are_marked():
    classes = [make_expert(), make_expert(act="relu")]
    assert len(classes) == 2 and all(is_draft(c) and is_draft(c(4, 3)) for c in classes)
    assert not is_draft(SwiGLU) and not is_draft(SwiGLU(4, 3))

    class Sub(classes[0]):
        pass

    assert is_draft(Sub)


def test_an_unknown_switch_value_is_refused():
    with pytest.raises(ValueError, match="act must be one of"):
        make_expert(act="tanh")
    with pytest.raises(ValueError, match="style must be one of"):
        choice("style", "x", ("a", "b"))


def test_a_draft_bound_as_expertnetwork_outside_the_static_check_earns_no_swiglu_points():
    """A factory looked up by a computed name hides it from the static check; the judge asks the kernel."""
    from course_judge import local
    from course_judge.s03_moe import expert

    answer = next(c for c in local.notebook("03_moe")["cells"]
                  if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == "ex_03_1_expert")
    src = "".join(answer["source"]) if isinstance(answer["source"], list) else answer["source"]
    counts = src[src.index("def moe_param_counts"):]
    hidden = ('ExpertNetwork = getattr(__import__("course_lib.expert" + "_drafts", fromlist=["_"]), "make_" + "expert")()'
              '\n\n\n' + counts)
    v = local.grade("03_moe", expert, [local.Alternative("a draft as the expert", source=hidden)])
    assert not v.rejected
    assert v.score == 0.5, v.report()  # the parameter counts only
    assert "one of the draft experts" in v.report()
