"""Exercise 5.1: find the two bugs of a draft block and fix its forward (pre-norm: MLA, then a dense SwiGLU or
DeepSeekMoE FFN). The construction is the given ``DraftBlock``'s; the learner's ``TransformerBlock`` subclasses it."""

from __future__ import annotations

import torch

from course_judge.checks import assert_true, expect_close, expect_tensor, expect_tuple
from course_judge.local import Alternative, Mutant
from course_judge.s05_integration._common import cfg, close, ffn_kind, load_weights, make_ref, remote_cfg
from course_lib.deepseek.model import TransformerBlock
from course_lib.deepseek.model_config import ModelConfig
from course_lib.deepseek.moe import MoE

GRADE_ID = "test_05_1_block"
POINTS = 3
ANSWERS = ("ex_05_1_block",)
SUMMARY = ("your block matches the reference block in float64 (the draft's two bugs, post-norm, parallel sub-layers, "
           "missing residuals named), the MoE's routing info, gradients, causality, cached absorbed decoding")
REFERENCE = ("course_lib.deepseek.model",)

POST_NORM = ("post-norm: the block normalises the sum, x = norm(x + attn(x)); DeepSeek-V3 is pre-norm, "
             "x + attn(attn_norm(x)): each sub-layer reads a normalised copy and adds its output to the raw stream")


def _call(k, blk, *args, **kw):
    y, info = expect_tuple(k.call_opts(blk, args, kw, no_grad=True), 2, "TransformerBlock.forward")
    return expect_tensor(y, "block output"), info


@torch.no_grad()
def _mistakes(ref: TransformerBlock, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the known wrong blocks, computed from the reference's own sub-layers."""
    def f(z):
        return ref.ffn(z)[0] if isinstance(ref.ffn, MoE) else ref.ffn(z)

    attn, an, fn = ref.attn, ref.attn_norm, ref.ffn_norm
    a = attn(an(x))
    u = x + a
    post = an(x + attn(x))
    return {
        POST_NORM: fn(post + f(post)),
        POST_NORM + " (attention sub-layer)": post + f(fn(post)),
        "parallel sub-layers: the FFN must read u = x + attention, not x": u + f(fn(x)),
        "both of the draft's bugs are still there: " + POST_NORM + "; and parallel sub-layers, the FFN must read u = x + "
        "attention, not x": post + f(fn(x)),
        "the FFN reads the un-normalised u (apply ffn_norm first)": u + f(u),
        "the attention reads the un-normalised x (apply attn_norm first)": (x + attn(x)) + f(fn(x + attn(x))),
        "the residual of the FFN is missing: h = u + ffn(ffn_norm(u))": f(fn(u)),
        "the residual of the attention is missing: u = x + attn(attn_norm(x))": a + f(fn(a)),
        "the FFN is never applied: h = u + ffn(ffn_norm(u))": u,
        "attn_norm and ffn_norm swapped": (x + attn(fn(x))) + f(an(x + attn(fn(x)))),
        "the attention reads ffn_norm(x): each sub-layer has its own norm, attn_norm before the attention":
            (x + attn(fn(x))) + f(fn(x + attn(fn(x)))),
    }


def judge(k, t):
    TB = k.g.TransformerBlock
    with t.part("visible checks: block 0 dense and block 1 MoE, shapes, routing info, identity with zeroed output projections", 1):
        c0 = ModelConfig()
        rc = remote_cfg(k, c0)
        k.seed(0)
        dense, moe = TB(0, rc), TB(1, rc)
        assert_true(ffn_kind(k, dense.ffn) == "SwiGLU" and ffn_kind(k, moe.ffn) == "MoE",
                    "block 0 should have a dense SwiGLU FFN and block 1 an MoE (CFG.n_dense_layers = 1)",
                    hint="dense SwiGLU(cfg.dim, cfg.inter_dim) for layer_id < n_dense_layers, MoE(cfg.moe()) after")
        x = torch.randn(2, 5, c0.dim, generator=torch.Generator().manual_seed(0))
        y, info = _call(k, dense, x)
        expect_tensor(y, "dense block output", shape=(2, 5, c0.dim))
        assert_true(info is None, "a dense block returns None as its routing info")
        y, info = _call(k, moe, x)
        expect_tensor(y, "MoE block output", shape=(2, 5, c0.dim))
        assert_true(getattr(info, "type", None) == "RoutingInfo", "an MoE block returns the MoE's RoutingInfo as its second value")
        sd = k.call(moe.state_dict)
        k.call(moe.load_state_dict, {n: torch.zeros_like(v) if n.endswith(("wo.weight", "w2.weight")) else v for n, v in sd.items()})
        y, _ = _call(k, moe, x)
        expect_close(y, x, atol=1e-6, name="block with zeroed output projections",
                     hint="both sub-layers add to the residual stream: u = x + attn(...), h = u + ffn(...)")

    c = cfg(n_layers=3, n_dense_layers=2, q_lora_rank=0)
    rc = remote_cfg(k, c)
    g = torch.Generator().manual_seed(5)
    blocks = {}
    with t.part("float64 against the reference block: layers 0, 1 (dense) and 2 (MoE) with n_dense_layers=2", 1):
        for lid in (0, 1, 2):
            want_kind = "MoE" if lid >= 2 else "SwiGLU"
            k.seed(10 + lid)
            blk = TB(lid, rc)
            kind = ffn_kind(k, blk.ffn)
            assert_true(kind == want_kind, f"layer {lid} with n_dense_layers=2 needs a {want_kind} FFN, got {kind}",
                        hint="dense SwiGLU(cfg.dim, cfg.inter_dim) for layer_id < n_dense_layers, MoE(cfg.moe()) after")
            torch.manual_seed(10 + lid)
            ref = make_ref(TransformerBlock(lid, c), 3 + lid)
            load_weights(k, blk, ref, f"TransformerBlock({lid})")
            x = torch.randn(2, 7, c.dim, dtype=torch.float64, generator=g)
            y, _ = _call(k, blk, x)
            with torch.no_grad():
                want, _ = ref(x)
            close(y, want, atol=1e-10, name=f"block {lid} output", mistakes=lambda ref=ref, x=x: _mistakes(ref, x),
                         hint="u = x + attn(attn_norm(x)); h = u + ffn(ffn_norm(u))")
            blocks[lid] = (blk, ref, x)

    with t.part("the MoE's own RoutingInfo (dense: None); every parameter gets the reference's gradient", 0.5):
        assert_true(len(blocks) == 3, "the block outputs must match the reference first (previous part)")
        for lid, (blk, ref, x) in blocks.items():
            got = k.grad(blk, x, wrt=[0], params=blk, output=0)
            xr = x.clone().requires_grad_(True)
            ref.zero_grad()
            want, winfo = ref(xr)
            want.sum().backward()
            _, info = got.out
            if lid < 2:
                assert_true(info is None, f"dense block {lid} returns None as routing info")
            else:
                assert_true(getattr(info, "type", None) == "RoutingInfo",
                            "the MoE block must return the MoE's RoutingInfo as its second value",
                            hint="an MoE returns (y, info): pass info up, return (u + y, info)")
                assert_true(torch.equal(info.load, winfo.load), "the RoutingInfo returned must be the MoE's own (same load)")
                expect_close(info.aux_loss, winfo.aux_loss.detach(), atol=1e-12, name="balance loss in the returned info")
            expect_close(got.grads[0], xr.grad, atol=1e-9, name=f"block {lid}: gradient of the output with respect to x")
            missing = [n for n, p in ref.named_parameters() if p.grad is not None and n not in got.param_grads]
            assert_true(not missing, f"block {lid}: no gradient for {missing[:4]}", hint="every sub-module must be used in forward")
            for n, p in ref.named_parameters():
                if p.grad is not None:
                    expect_close(got.param_grads[n], p.grad, atol=1e-9, name=f"block {lid}: gradient of {n}")

    with t.part("causal, and cached absorbed decoding: prefill 5 positions, decode position 5 (start_pos and cache passed on)", 0.5):
        assert_true(2 in blocks, "the MoE block must match the reference first")
        blk, ref, x = blocks[2]
        x2 = x.clone()
        x2[:, 4:] += 1.0
        a, _ = _call(k, blk, x2)
        b, _ = _call(k, blk, x)
        expect_close(a[:, :4], b[:, :4], atol=1e-12, name="outputs before a change of later inputs",
                     hint="pass the inputs through self.attn, which applies the causal mask")
        c1 = k.call_opts(blk.attn.new_cache, (2, 16), keep=True)
        r1 = ref.attn.new_cache(2, 16)
        with torch.no_grad():
            want_pre, _ = ref(x[:, :5], 0, r1, absorb=True)
            no_cache = ref(x[:, 5:6], 5, None, absorb=True)[0]
            want_dec, _ = ref(x[:, 5:6], 5, r1, absorb=True)
        y, _ = _call(k, blk, x[:, :5], 0, c1, absorb=True)
        expect_close(y, want_pre, atol=1e-10, name="prefill with a cache")
        y, _ = _call(k, blk, x[:, 5:6], 5, c1, absorb=True)
        length = k.get(c1.length)
        assert_true(length == 6, f"the cache should hold 6 positions after prefill + one decode step, holds {length}",
                    hint="pass start_pos and cache through to self.attn")
        expect_close(y, want_dec, atol=1e-10, name="decode one token at start_pos 5",
                     mistakes={"the cache is not passed to self.attn: the new token attends only to itself": no_cache},
                     hint="pass start_pos, cache and absorb through to self.attn")


_SOLUTION_BODY = """        u = x + self.attn(self.attn_norm(x), start_pos, cache, absorb=absorb)  # (B, T, dim)
        if isinstance(self.ffn, MoE):
            y, info = self.ffn(self.ffn_norm(u))  # (B, T, dim)
            return u + y, info
        return u + self.ffn(self.ffn_norm(u)), None
"""
_DRAFT_BODY = """        h = self.attn_norm(x + self.attn(x, start_pos, cache, absorb=absorb))  # (B, T, dim)
        out = self.ffn(self.ffn_norm(x))  # (B, T, dim), or (y, info) from an MoE
        y, info = out if isinstance(out, tuple) else (out, None)
        return h + y, info
"""
MUTANTS = [
    Mutant("post-norm attention", "u = x + self.attn(self.attn_norm(x), start_pos, cache, absorb=absorb)",
           "u = self.attn_norm(x + self.attn(x, start_pos, cache, absorb=absorb))", expect="post-norm"),
    Mutant("parallel sub-layers", "self.ffn(self.ffn_norm(u))", "self.ffn(self.ffn_norm(x))", count=2, expect="parallel sub-layers"),
    Mutant("FFN residual missing", "return u + y, info", "return y, info", expect="residual of the FFN"),
    Mutant("attention without its norm", "self.attn(self.attn_norm(x), start_pos", "self.attn(x, start_pos",
           expect="un-normalised x"),
    Mutant("attention reads ffn_norm", "self.attn(self.attn_norm(x), start_pos", "self.attn(self.ffn_norm(x), start_pos",
           expect="its own norm"),
    Mutant("the draft handed in unchanged", _SOLUTION_BODY, _DRAFT_BODY, expect="both of the draft's bugs"),
    Mutant("only the post-norm fixed", _SOLUTION_BODY, _DRAFT_BODY.replace(
        "h = self.attn_norm(x + self.attn(x, start_pos, cache, absorb=absorb))",
        "h = x + self.attn(self.attn_norm(x), start_pos, cache, absorb=absorb)"), expect="parallel sub-layers"),
    Mutant("only the FFN input fixed", _SOLUTION_BODY, _DRAFT_BODY.replace("self.ffn_norm(x)", "self.ffn_norm(h)"),
           expect="post-norm"),
    Mutant("routing info dropped", "return u + y, info", "return u + y, None", expect="RoutingInfo"),
    Mutant("start_pos not passed", "self.attn(self.attn_norm(x), start_pos, cache, absorb=absorb)",
           "self.attn(self.attn_norm(x), 0, cache, absorb=absorb)", expect="start_pos"),
    Mutant("cache not passed", "self.attn(self.attn_norm(x), start_pos, cache, absorb=absorb)",
           "self.attn(self.attn_norm(x), start_pos, None, absorb=absorb)", expect="cache"),
]

ALTERNATIVES = [
    Alternative("tuple check and torch.add", source='''
class TransformerBlock(DraftBlock):
    def forward(self, x, start_pos=0, cache=None, *, absorb=False):
        ### BEGIN SOLUTION
        h = torch.add(x, self.attn(self.attn_norm(x), start_pos=start_pos, cache=cache, absorb=absorb))
        out = self.ffn(self.ffn_norm(h))
        y, info = out if isinstance(out, tuple) else (out, None)
        return torch.add(h, y), info
        ### END SOLUTION
'''),
    Alternative("the draft's two lines fixed in place", source='''
class TransformerBlock(DraftBlock):
    def forward(self, x, start_pos=0, cache=None, *, absorb=False):
        ### BEGIN SOLUTION
        h = x + self.attn(self.attn_norm(x), start_pos, cache, absorb=absorb)  # pre-norm attention
        out = self.ffn(self.ffn_norm(h))  # the FFN reads the stream after attention
        y, info = out if isinstance(out, tuple) else (out, None)
        return h + y, info
        ### END SOLUTION
'''),
]
