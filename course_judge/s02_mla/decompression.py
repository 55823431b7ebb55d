"""Exercise 2.3: MLA's up-projections, decoupled RoPE (q_pe and ONE shared k_pe), per-head keys/values, absorbed weights."""

from __future__ import annotations

import torch

from course_judge.checks import assert_true, expect_tensor, expect_tuple
from course_judge.local import Alternative, Mutant
from course_judge.s02_mla._common import ODD, ONE_HEAD, TINY, close, install, kernel_cfg, randn, seeded_weights, single_threaded
from course_lib.deepseek.attention import MLAConfig
from course_lib.deepseek.common import apply_rope, rope_angles

GRADE_ID = "test_02_3_decompression"
POINTS = 3
ANSWERS = ("ex_02_3_decompression",)
SUMMARY = ("parameter shapes, q_nope / q_pe per head with RoPE on q_pe only (start positions up to 4000), the shared rotated "
           "k_pe, keys [k_nope ; k_pe] and values against the reference in float64 (d_v != d_h, one head), exact w_uk / w_uv")
REFERENCE = ("course_lib.deepseek.mla",)

_CASES = [(TINY, 2, 6, 0), (ODD, 1, 3, 1000), (ONE_HEAD, 3, 1, 7), (ODD, 2, 2, 4000)]
_LAYOUT = "wq_b's output is laid out per head as [q_nope ; q_pe]: view(B, T, n_heads, d_h + d_h^R), then split [d_h, d_h^R]"
_KV_LAYOUT = "wkv_b's output is laid out per head as [k_nope ; v]: view(B, S, n_heads, d_h + d_v), then split [d_h, d_v]"


def _shapes(c: MLAConfig) -> dict[str, tuple]:
    return {"wq_b.weight": (c.n_heads * c.qk_head_dim, c.q_lora_rank),
            "wkv_b.weight": (c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)}


def _build(k, c: MLAConfig, seed: int):
    dec = k.call(k.g.DecompressionWithRoPE, kernel_cfg(k, c))
    W = seeded_weights(_shapes(c), seed)
    install(k, dec, W, _shapes(c), "DecompressionWithRoPE",
            hint="wq_b gives per-head [q_nope ; q_pe], wkv_b per-head [k_nope ; v]; k_pe has no per-head weights; no biases")
    return dec, W


def _call(k, ref, *args):
    return k.call_opts(ref, args, no_grad=True)


def _pair(k, ref, what, *args):
    a, b = expect_tuple(_call(k, ref, *args), 2, what)
    return expect_tensor(a, what), expect_tensor(b, what)


@single_threaded
def judge(k, t):
    g = torch.Generator().manual_seed(23)
    with t.part("visible checks: shapes, q_nope independent of position, q_pe rotated, one k_pe in every head, w_uk / w_uv", 1):
        k.seed(0)
        dec = k.call(k.call(k.g.DecompressionWithRoPE, kernel_cfg(k, TINY)).double)
        c_q, c_kv, k_raw = randn(g, 2, 5, 48), randn(g, 2, 5, 32), randn(g, 2, 5, 8)
        a0 = rope_angles(torch.arange(5), 8, dtype=torch.float64)
        a1 = rope_angles(torch.arange(50, 55), 8, dtype=torch.float64)
        qn, qp = _pair(k, dec.queries, "queries(c_q, angles)", c_q, a0)
        expect_tensor(qn, "q_nope", shape=(2, 5, 4, 16))
        expect_tensor(qp, "q_pe", shape=(2, 5, 4, 8))
        qn1, qp1 = _pair(k, dec.queries, "queries(c_q, angles)", c_q, a1)
        close(qn1, qn, atol=0, name="q_nope at other positions", hint="RoPE only on the rope slice")
        assert_true(not torch.allclose(qp1, qp), "q_pe must change with position (rotate it)")
        kpe = expect_tensor(_call(k, dec.rope_key, k_raw, a0), "rotated k_pe", shape=(2, 5, 8))
        kk, v = _pair(k, dec.keys_values, "keys_values(c_kv, k_pe)", c_kv, kpe)
        expect_tensor(kk, "k = [k_nope ; k_pe]", shape=(2, 5, 4, 24))
        expect_tensor(v, "v", shape=(2, 5, 4, 12))
        for h in range(4):
            close(kk[:, :, h, 16:], kpe, atol=0, name=f"rope part of head {h}'s key", hint="every head uses the same k_pe")
        w_uk, w_uv = _pair(k, dec.absorbed_weights, "absorbed_weights()")
        expect_tensor(w_uk, "w_uk", shape=(4, 16, 32))
        expect_tensor(w_uv, "w_uv", shape=(4, 12, 32))
        close(c_kv @ w_uk[1].T, kk[:, :, 1, :16], atol=1e-12, name="k_nope of head 1 from w_uk")

    runs = []
    with t.part("queries against the reference in float64: per-head [q_nope ; q_pe], RoPE on q_pe only, start positions "
                "0, 7, 1000 and 4000", 0.5):
        for i, (c, B, T, sp) in enumerate(_CASES):  # run every configuration first: the later parts use the outputs
            dec, W = _build(k, c, 300 + i)
            H, dn, dr = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
            a = rope_angles(torch.arange(sp, sp + T), dr, c.rope_theta, dtype=torch.float64)
            c_q = randn(g, B, T, c.q_lora_rank)
            runs.append((c, W, dec, a, sp, B, T, _pair(k, dec.queries, "queries(c_q, angles)", c_q, a), c_q))
        for c, W, _, a, sp, B, T, (qn, qp), c_q in runs:
            H, dn, dr = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
            q = (c_q @ W["wq_b.weight"].T).view(B, T, H, dn + dr)
            rot_all = apply_rope(q, rope_angles(torch.arange(sp, sp + T), dn + dr, c.rope_theta, dtype=torch.float64))
            flat = c_q @ W["wq_b.weight"].T
            glob_n, glob_p = flat[..., :H * dn].reshape(B, T, H, dn), flat[..., H * dn:].reshape(B, T, H, dr)
            close(qn, q[..., :dn], atol=1e-12, name=f"q_nope ({H} heads, start {sp})",
                  mistakes={"pitfall: RoPE applied to the whole head: q_nope must not be rotated": rot_all[..., :dn],
                            f"q_nope is taken from the end of each head's block: {_LAYOUT}": q[..., dr:],
                            f"the heads are split after separating all q_nope from all q_pe: {_LAYOUT}": glob_n},
                  hint=_LAYOUT)
            close(qp, apply_rope(q[..., dn:], a), atol=1e-12, name=f"q_pe ({H} heads, start {sp})",
                  mistakes={"q_pe is not rotated: apply_rope(q_pe, angles)": q[..., dn:],
                            "pitfall: RoPE applied to the whole head: only the q_pe slice is rotated (with the angles given)":
                                rot_all[..., dn:]},
                  hint="q_pe = RoPE(the last qk_rope_head_dim numbers of each head's query)")
            assert_true(c.n_heads == 1 or not torch.allclose(qp, apply_rope(glob_p, a)), f"the heads are split wrongly: {_LAYOUT}")

    with t.part("rope_key: ONE rotary key per token, shared by the heads, rotated by the angles given, nothing else", 0.5):
        assert_true(len(runs) == len(_CASES), "DecompressionWithRoPE could not be built or run, so rope_key cannot be checked")
        for c, _, dec, a, sp, B, T, _, _ in runs:
            dr = c.qk_rope_head_dim
            kr = randn(g, B, T, dr)
            got = expect_tensor(_call(k, dec.rope_key, kr, a), "rope_key(k_pe, angles)")
            assert_true(tuple(got.shape) == (B, T, dr), f"pitfall: k_pe made per-head: rope_key returned {tuple(got.shape)}, "
                        f"expected {(B, T, dr)}", hint="one rotary key per token, shared by all heads")
            close(got, apply_rope(kr, a), atol=1e-12, name=f"rotated k_pe (start {sp})",
                  mistakes={"k_pe is not rotated: apply_rope(k_pe, angles)": kr,
                            "k_pe is normalised: rope_key only rotates it":
                                apply_rope(kr * torch.rsqrt(kr.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps), a)},
                  hint="apply_rope(k_pe, angles), nothing else (no norm)")

    with t.part("keys_values against the reference: [k_nope_h ; k_pe] with the same k_pe in every head, values (d_v != d_h)", 0.5):
        from course_lib.deepseek.mla import MLA

        assert_true(len(runs) == len(_CASES), "DecompressionWithRoPE could not be built or run, so keys_values cannot be checked")
        for c, W, dec, _, _, B, T, _, _ in runs:
            ref = MLA(c).double()
            ref.load_state_dict({**ref.state_dict(), **W})
            H, dn, dr, dv, dc = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
            S = T + 3
            c_kv, kpe = randn(g, B, S, dc), randn(g, B, S, dr)
            kk, v = _pair(k, dec.keys_values, "keys_values(c_kv, k_pe)", c_kv, kpe)
            with torch.no_grad():
                rk, rv = ref.expand(c_kv, kpe)
            for h in range(H):
                assert_true(tuple(kk.shape) == (B, S, H, dn + dr) and torch.equal(kk[:, :, h, dn:], kpe),
                            f"pitfall: k_pe made per-head: head {h}'s rope key is not the shared k_pe",
                            hint="k[..., h, d_h:] is the same rotated k_pe for every head (broadcast, no per-head weights)")
            up = c_kv @ W["wkv_b.weight"].T
            glob_k = up[..., :H * dn].reshape(B, S, H, dn)
            close(kk, rk, atol=1e-12, name=f"keys [k_nope ; k_pe] ({H} heads)",
                  mistakes={f"the heads are split after separating all k_nope from all v: {_KV_LAYOUT}": torch.cat(
                      [glob_k, kpe[:, :, None].expand(B, S, H, dr)], -1)},
                  hint=_KV_LAYOUT)
            expect_tensor(v, "v", shape=(B, S, H, dv), hint="each head's block of wkv_b's output is [k_nope (d_h) ; v (d_v)]")
            close(v, rv, atol=1e-12, name=f"values ({H} heads)",
                  mistakes={f"the heads are split after separating all k_nope from all v: {_KV_LAYOUT}":
                            up[..., H * dn:].reshape(B, S, H, dv)},
                  hint=_KV_LAYOUT)

    with t.part("absorbed_weights: w_uk (H, d_h, d_c) and w_uv (H, d_v, d_c) are exactly wkv_b's per-head blocks", 0.5):
        from course_lib.deepseek.mla import MLA

        assert_true(len(runs) == len(_CASES), "DecompressionWithRoPE could not be built or run, so absorbed_weights cannot be checked")
        for c, W, dec, *_ in runs:
            ref = MLA(c).double()
            ref.load_state_dict({**ref.state_dict(), **W})
            H, dn, dv, dc = c.n_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
            uk, uv = _pair(k, dec.absorbed_weights, "absorbed_weights()")
            ruk, ruv = ref.w_uk_uv()
            wb = W["wkv_b.weight"]
            expect_tensor(uk, "w_uk", shape=(H, dn, dc), hint="w_uk[h] is (d_h, d_c): k_nope[..., h, :] = c_kv @ w_uk[h].T")
            expect_tensor(uv, "w_uv", shape=(H, dv, dc), hint="w_uv[h] is (d_v, d_c): v[..., h, :] = c_kv @ w_uv[h].T")
            close(uk, ruk.detach(), atol=0, name=f"w_uk ({H} heads)",
                  mistakes={f"w_uk takes the first n_heads * d_h rows of wkv_b: {_KV_LAYOUT}": wb[:H * dn].reshape(H, dn, dc)},
                  hint="wkv_b.weight viewed as (H, d_h + d_v, d_c): the first d_h rows of each head")
            close(uv, ruv.detach(), atol=0, name=f"w_uv ({H} heads)",
                  mistakes={f"w_uv takes the last n_heads * d_v rows of wkv_b: {_KV_LAYOUT}": wb[H * dn:].reshape(H, dv, dc)},
                  hint="wkv_b.weight viewed as (H, d_h + d_v, d_c): the last d_v rows of each head")


_Q_SPLIT = "q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)\n        return q_nope, apply_rope(q_pe, angles)"
_KV_SPLIT = ("kv = self.wkv_b(c_kv).view(B, S, c.n_heads, c.qk_nope_head_dim + c.v_head_dim)  # (B, S, H, d_h + d_v)\n"
             "        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)")

MUTANTS = [
    Mutant("RoPE on the whole query head", _Q_SPLIT,
           "q = apply_rope(q, rope_angles(angles[:, 0], c.qk_head_dim, c.rope_theta, dtype=torch.float64))\n"
           "        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)\n        return q_nope, q_pe",
           expect="RoPE applied to the whole head"),
    Mutant("query layout [q_pe ; q_nope]", _Q_SPLIT,
           "q_pe, q_nope = q.split([c.qk_rope_head_dim, c.qk_nope_head_dim], dim=-1)\n        return q_nope, apply_rope(q_pe, angles)",
           expect="end of each head's block"),
    Mutant("q_pe not rotated", "return q_nope, apply_rope(q_pe, angles)", "return q_nope, q_pe", expect="rotate it"),
    Mutant("k_pe not rotated", "return apply_rope(k_pe, angles)  # (B, T, d_h^R)", "return k_pe", expect="k_pe is not rotated"),
    Mutant("wkv_b split globally", _KV_SPLIT,
           "k_nope, v = self.wkv_b(c_kv).split([c.n_heads * c.qk_nope_head_dim, c.n_heads * c.v_head_dim], dim=-1)\n"
           "        k_nope, v = k_nope.reshape(B, S, c.n_heads, -1), v.reshape(B, S, c.n_heads, -1)",
           expect="separating all k_nope from all v"),
    Mutant("w_uk and w_uv swapped", "return w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim :]",
           "return w[:, c.qk_nope_head_dim :], w[:, : c.qk_nope_head_dim]", expect="w_uk has shape"),
    Mutant("absorbed weights from a global split",
           "w = self.wkv_b.weight.view(c.n_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)  # (H, d_h + d_v, d_c)\n"
           "        return w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim :]",
           "w = self.wkv_b.weight\n        n = c.n_heads * c.qk_nope_head_dim\n"
           "        return w[:n].reshape(c.n_heads, -1, c.kv_lora_rank), w[n:].reshape(c.n_heads, -1, c.kv_lora_rank)",
           expect="first n_heads * d_h rows"),
    Mutant("wq_b without the rope part", "nn.Linear(cfg.q_lora_rank, cfg.n_heads * cfg.qk_head_dim, bias=False)",
           "nn.Linear(cfg.q_lora_rank, cfg.n_heads * cfg.qk_nope_head_dim, bias=False)", expect="wq_b gives per-head"),
    Mutant("k_pe normalised", "return apply_rope(k_pe, angles)  # (B, T, d_h^R)",
           "return apply_rope(k_pe * torch.rsqrt(k_pe.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps), angles)",
           expect="k_pe is normalised"),
]

ALTERNATIVES = [
    Alternative("reshape, slicing, einsum and permute", source='''
class DecompressionWithRoPE(nn.Module):
    """MLA's up-projections and decoupled RoPE."""

    def __init__(self, cfg: MLAConfig):
        super().__init__()
        self.cfg = cfg
        ### BEGIN SOLUTION
        H = cfg.n_heads
        self.wq_b = nn.Linear(cfg.q_lora_rank, H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), bias=False)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        ### END SOLUTION

    def queries(self, c_q, angles):
        ### BEGIN SOLUTION
        c = self.cfg
        q = self.wq_b(c_q).reshape(*c_q.shape[:2], c.n_heads, -1)
        return q[..., : c.qk_nope_head_dim], apply_rope(q[..., c.qk_nope_head_dim :], angles)
        ### END SOLUTION

    def rope_key(self, k_pe, angles):
        ### BEGIN SOLUTION
        return apply_rope(k_pe, angles)
        ### END SOLUTION

    def absorbed_weights(self):
        ### BEGIN SOLUTION
        c = self.cfg
        w = self.wkv_b.weight.T.reshape(c.kv_lora_rank, c.n_heads, -1).permute(1, 2, 0)  # (H, d_h + d_v, d_c)
        return w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim :]
        ### END SOLUTION

    def keys_values(self, c_kv, k_pe):
        ### BEGIN SOLUTION
        w_uk, w_uv = self.absorbed_weights()
        k_nope = torch.einsum("bsc,hdc->bshd", c_kv, w_uk)
        v = torch.einsum("bsc,hdc->bshd", c_kv, w_uv)
        k_rot = k_pe.unsqueeze(2).repeat(1, 1, self.cfg.n_heads, 1)
        return torch.cat((k_nope, k_rot), dim=3), v
        ### END SOLUTION
'''),
]
