"""Exercise 5.2.1: find the two bugs of a draft MTP depth and fix its forward. The construction is the given
``DraftMTP``'s (the learner's ``MTPModule`` subclasses it); the draft detaches ``h`` and normalises the embedding with
``hnorm``, two mistakes that leave every value at initialisation unchanged (unit norm gains)."""

from __future__ import annotations

import torch

from course_judge.checks import assert_true, expect_close, expect_tensor, expect_tuple
from course_judge.local import Alternative, Mutant
from course_judge.s05_integration._common import cfg, close, ffn_kind, load_weights, make_ref, remote_cfg
from course_lib.deepseek.model import MTPModule
from course_lib.deepseek.model_config import ModelConfig

GRADE_ID = "test_05_2_mtp"
POINTS = 2
ANSWERS = ("ex_05_2_mtp",)
SUMMARY = ("float64 against the reference depth with trained (non-unit) norm gains: the draft's two bugs named, the "
           "[hnorm(h) ; enorm(emb)] order, the output before norm; its own parameters only (shared embedding and head), "
           "gradients to both inputs")

DETACHED = ("no gradient reaches h_prev: the MTP loss must train the main model through h (that is what makes its "
            "states plan the token after next); do not detach h")
SHARED_NORM = ("hnorm normalises the embedding too: h and Emb(t_(i+k)) have norms of their own, enorm for the embedding "
               "(with unit gains the two agree, which is why the draft's output looks right at initialisation)")
REFERENCE = ("course_lib.deepseek.model",)


def _call(k, m, *args):
    y, info = expect_tuple(k.call_opts(m, args, {}, no_grad=True), 2, "MTPModule.forward")
    return expect_tensor(y, "MTP output"), info


@torch.no_grad()
def _mistakes(ref: MTPModule, h: torch.Tensor, e: torch.Tensor) -> dict[str, torch.Tensor]:
    def run(a, b):
        return ref.block(ref.proj(torch.cat([a, b], -1)))[0]

    right = run(ref.hnorm(h), ref.enorm(e))
    return {
        "the projection's input is [enorm(emb) ; hnorm(h)]: the order is [hnorm(h) ; enorm(emb)] (the paper's; "
        "the released checkpoint's eh_proj stores the halves the other way round)": run(ref.enorm(e), ref.hnorm(h)),
        "h and the embedding are concatenated without their norms: normalise h with hnorm and the embedding with enorm":
            run(h, e),
        "hnorm and enorm swapped: hnorm normalises h, enorm the embedding": run(ref.enorm(h), ref.hnorm(e)),
        SHARED_NORM: run(ref.hnorm(h), ref.hnorm(e)),
        SHARED_NORM + "; and the order is [hnorm(h) ; enorm(emb)]": run(ref.hnorm(e), ref.hnorm(h)),
        "enorm normalises h too: h has its own norm, hnorm": run(ref.enorm(h), ref.enorm(e)),
        "only h is normalised: the embedding needs enorm too": run(ref.hnorm(h), e),
        "only the embedding is normalised: h needs hnorm too": run(h, ref.enorm(e)),
        "self.norm is applied in forward: return the block's output before norm (the model applies it, then the shared head)":
            ref.norm(right),
        "the block is skipped: h^k = block(proj([hnorm(h) ; enorm(emb)]))": ref.proj(torch.cat([ref.hnorm(h), ref.enorm(e)], -1)),
    }


def judge(k, t):
    MTP = k.g.MTPModule
    with t.part("visible checks: output shape, proj (M_k) of shape (dim, 2 dim), no embedding or head of its own, "
                "gradients reach h_prev, hnorm, enorm and proj", 1):
        c0 = ModelConfig()
        k.seed(0)
        m = MTP(c0.n_layers, remote_cfg(k, c0))
        g = torch.Generator().manual_seed(0)
        y, _ = _call(k, m, torch.randn(2, 6, c0.dim, generator=g), torch.randn(2, 6, c0.dim, generator=g))
        expect_tensor(y, "MTP output", shape=(2, 6, c0.dim))
        names = k.info(m).get("parameters", {})
        assert_true(tuple(names.get("proj.weight", ())) == (c0.dim, 2 * c0.dim),
                    f"proj (M_k) weight should have shape ({c0.dim}, {2 * c0.dim}), got {names.get('proj.weight')}",
                    hint="self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)")
        assert_true(not any("embed" in n or "head" in n for n in names),
                    "the MTP module must not own an embedding or a head: the model's are shared")
        h0, e0 = torch.randn(2, 6, c0.dim, generator=g), torch.randn(2, 6, c0.dim, generator=g)
        got = k.grad(m, h0, e0, wrt=[0, 1], params=m, output=0)
        assert_true(got.grads[0] is not None and bool(got.grads[0].abs().sum() > 0), DETACHED,
                    hint="which states does the MTP loss reach, and should it?")
        silent = [n for n in names if n.startswith(("hnorm.", "enorm.", "proj.")) and (
            n not in got.param_grads or not bool(got.param_grads[n].abs().sum() > 0))]
        assert_true(not silent, f"parameters with no gradient: {silent[:4]}"
                    + ("; " + SHARED_NORM if any(n.startswith("enorm.") for n in silent) else ""),
                    hint="a module the equation uses but forward never calls gets no gradient")

    g = torch.Generator().manual_seed(21)
    cases = [cfg(n_layers=2), cfg(n_layers=1, n_dense_layers=1, q_lora_rank=0, dim=16, n_heads=2, kv_lora_rank=8, inter_dim=20)]
    built = []
    with t.part("float64 against the reference MTP depth (an MoE block, and a dense block without query compression)", 0.5):
        for c in cases:
            k.seed(4)
            m = MTP(c.n_layers, remote_cfg(k, c))
            want = "MoE" if c.is_moe_layer(c.n_layers) else "SwiGLU"
            kind = ffn_kind(k, m.block.ffn)
            assert_true(kind == want, f"MTPModule({c.n_layers}, cfg)'s block should have a {want} FFN, got {kind}",
                        hint="self.block = TransformerBlock(layer_id, cfg): the MTP block is layer n_layers + k")
            torch.manual_seed(4)
            ref = make_ref(MTPModule(c.n_layers, c), 4)
            load_weights(k, m, ref, "MTPModule")
            h = torch.randn(3, 9, c.dim, dtype=torch.float64, generator=g) * 3
            e = torch.randn(3, 9, c.dim, dtype=torch.float64, generator=g) * 0.1
            y, info = _call(k, m, h, e)
            with torch.no_grad():
                want_y, want_info = ref(h, e)
            close(y, want_y, atol=1e-10, name="MTP output", mistakes=lambda ref=ref, h=h, e=e: _mistakes(ref, h, e),
                         hint="h^k = block(proj([hnorm(h) ; enorm(emb)]))")
            if want_info is not None:
                assert_true(getattr(info, "type", None) == "RoutingInfo" and torch.equal(info.load, want_info.load),
                            "return the block's routing info as the second value", hint="return self.block(x)")
            built.append((m, ref, h, e))

    with t.part("parameters: hnorm, enorm, proj, block and norm only; gradients reach h and the embedding", 0.5):
        assert_true(len(built) == 2, "the MTP output must match the reference first (previous part)")
        for m, ref, h, e in built:
            n_ref = sum(p.numel() for p in ref.parameters())
            n_got = sum(int(torch.Size(s).numel()) for s in k.info(m).get("parameters", {}).values())
            assert_true(n_got == n_ref, f"the MTP module has {n_got} parameters, hnorm + enorm + proj + block + norm have {n_ref}")
            got = k.grad(m, h, e, wrt=[0, 1], params=m, output=0)
            hr, er = h.clone().requires_grad_(True), e.clone().requires_grad_(True)
            ref.zero_grad()
            ref(hr, er)[0].sum().backward()
            assert_true(got.grads[0] is not None, DETACHED)
            assert_true(got.grads[1] is not None, "no gradient reaches the embedding: do not detach it (it is the "
                        "model's, shared, and the MTP loss trains it too)")
            expect_close(got.grads[0], hr.grad, atol=1e-9, name="gradient with respect to h_prev",
                         hint="do not detach h: the MTP loss trains the main model through it")
            expect_close(got.grads[1], er.grad, atol=1e-9, name="gradient with respect to the embedding")
            for n, p in ref.named_parameters():
                if p.grad is not None:
                    assert_true(n in got.param_grads, f"no gradient for {n}", hint="every sub-module must be used in forward")
                    expect_close(got.param_grads[n], p.grad, atol=1e-9, name=f"gradient of {n}")


_SOLUTION_BODY = """        x = self.proj(torch.cat([self.hnorm(h_prev), self.enorm(emb_next)], dim=-1))  # (B, T', 2 dim) -> (B, T', dim)
        return self.block(x)
"""
_DRAFT_BODY = """        h = h_prev.detach()  # the MTP module has its own loss
        x = self.proj(torch.cat([self.hnorm(h), self.hnorm(emb_next)], dim=-1))  # (B, T', dim)
        return self.block(x)
"""
_CAT = "torch.cat([self.hnorm(h_prev), self.enorm(emb_next)], dim=-1)"
MUTANTS = [
    Mutant("the draft handed in unchanged", _SOLUTION_BODY, _DRAFT_BODY, expect="hnorm normalises the embedding too"),
    Mutant("only the shared norm fixed", _SOLUTION_BODY, _DRAFT_BODY.replace("self.hnorm(emb_next)", "self.enorm(emb_next)"),
           expect="do not detach h"),
    Mutant("only the detach fixed", _SOLUTION_BODY, _DRAFT_BODY.replace("h_prev.detach()", "h_prev"),
           expect="hnorm normalises the embedding too"),
    Mutant("h detached", "self.hnorm(h_prev)", "self.hnorm(h_prev.detach())", expect="do not detach h"),
    Mutant("[emb ; h] order", _CAT, "torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1)",
           expect="the order is [hnorm(h) ; enorm(emb)]"),
    Mutant("no norms", _CAT, "torch.cat([h_prev, emb_next], dim=-1)", expect="without their norms"),
    Mutant("norms swapped", _CAT, "torch.cat([self.enorm(h_prev), self.hnorm(emb_next)], dim=-1)",
           expect="hnorm and enorm swapped"),
    Mutant("enorm for both", _CAT, "torch.cat([self.enorm(h_prev), self.enorm(emb_next)], dim=-1)",
           expect="enorm normalises h too"),
    Mutant("norm applied in forward", "        return self.block(x)\n",
           "        h, info = self.block(x)\n        return self.norm(h), info\n", expect="before norm"),
    Mutant("the block skipped", "        return self.block(x)\n", "        return x, None\n", expect="the block is skipped"),
]

ALTERNATIVES = [
    Alternative("the projection split into its two halves", source='''
class MTPModule(DraftMTP):
    def forward(self, h_prev, emb_next):
        ### BEGIN SOLUTION
        d = h_prev.shape[-1]
        w_h, w_e = self.proj.weight[:, :d], self.proj.weight[:, d:]  # M_k = [W_h | W_e]
        x = self.hnorm(h_prev) @ w_h.T + self.enorm(emb_next) @ w_e.T
        out, info = self.block(x)
        return out, info
        ### END SOLUTION
'''),
    Alternative("the draft's two lines fixed in place", source='''
class MTPModule(DraftMTP):
    def forward(self, h_prev, emb_next):
        ### BEGIN SOLUTION
        h = h_prev  # not detached: the MTP loss trains the main model too
        x = self.proj(torch.cat([self.hnorm(h), self.enorm(emb_next)], dim=-1))
        return self.block(x)
        ### END SOLUTION
'''),
]
