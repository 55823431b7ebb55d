"""Exercise 5.2.3: total, active and MTP parameters from the config alone."""

from __future__ import annotations

from course_judge.checks import assert_true, expect_int
from course_judge.local import Alternative, Mutant
from course_judge.s05_integration._common import SMALL, remote_cfg
from course_lib.deepseek.model import param_counts
from course_lib.deepseek.model_config import ModelConfig

GRADE_ID = "test_05_4_counts"
POINTS = 4
ANSWERS = ("ex_05_4_counts",)
SUMMARY = ("total, active and MTP counts of five configs (query compression on and off, all dense, MTP depth 2, two shared "
           "experts) against the modules, each usual slip named (the active convention and the router bias included); "
           "DeepSeek-V3's 671.0B / 36.6B / 11.6B")
REFERENCE = ("course_lib.deepseek.model", "course_lib.param_count")

CASES = (dict(n_layers=3, n_dense_layers=1), dict(q_lora_rank=0, n_layers=2, n_dense_layers=0, mtp_depth=2),
         dict(n_layers=2, n_dense_layers=2), dict(n_shared_experts=2, n_activated_experts=3, n_layers=4, n_dense_layers=2))


def _variants(c: ModelConfig) -> dict[str, dict[str, int]]:
    """The counts of the usual slips, each computed from the correct ones (so the judge names the slip)."""
    r = param_counts(c)
    d, H = c.dim, c.n_heads
    n_moe = sum(c.is_moe_layer(i) for i in range(c.n_layers))
    n_mtp_moe = sum(c.is_moe_layer(c.n_layers + k) for k in range(c.mtp_depth))
    expert = 3 * d * c.moe_inter_dim
    per_block = {  # a change of every block's count, main and MTP
        "the gate bias is a buffer (moved by the balancing rule), not a parameter: do not count it": (c.n_routed_experts, "moe"),
        "the RoPE key k_pe comes out of wkv_a too: W_DKV and W_KR are one (dim, kv_lora_rank + qk_rope_head_dim) matrix":
            (-d * c.qk_rope_head_dim, "all"),
        "kv_norm (an RMSNorm of kv_lora_rank) is missing": (-c.kv_lora_rank, "all"),
        "each block has two RMSNorms (attn_norm, ffn_norm) of dim": (-2 * d, "all"),
        "the keys have d_h + d_h^R per head but wkv_b makes only k_nope and v: kv_lora_rank x H (d_h + d_v)":
            (c.kv_lora_rank * H * c.qk_rope_head_dim, "all"),
    }
    if c.q_lora_rank:
        per_block["q_norm (an RMSNorm of q_lora_rank) is missing"] = (-c.q_lora_rank, "all")
    else:
        per_block["q_lora_rank = 0 means one W_Q of dim x H (d_h + d_h^R) and no q_norm"] = (
            -d * H * (c.qk_nope_head_dim + c.qk_rope_head_dim), "all")
    out: dict[str, dict[str, int]] = {}
    for why, (delta, where) in per_block.items():
        n_main = n_moe if where == "moe" else c.n_layers
        n_m = n_mtp_moe if where == "moe" else c.mtp_depth
        out[why] = {"total": r["total"] + n_main * delta, "active": r["active"] + n_main * delta, "mtp": r["mtp"] + n_m * delta}
    emb = c.vocab_size * d
    out["the output head is a matrix of its own (not tied to the embedding), and every token multiplies it: count it"] = {
        "total": r["total"] - emb, "active": r["active"] - emb, "mtp": r["mtp"]}
    out["the final RMSNorm (dim) before the head is missing"] = {"total": r["total"] - d, "active": r["active"] - d, "mtp": r["mtp"]}
    out["active subtracts the shared experts too: they run for every token"] = {
        "total": r["total"], "active": r["active"] - n_moe * c.n_shared_experts * expert, "mtp": r["mtp"]}
    skipped = n_moe * (c.n_routed_experts - c.n_activated_experts) * expert
    out["active keeps every routed expert: subtract the n_routed - n_activated experts a token skips in each MoE layer"] = {
        "total": r["total"], "active": r["active"] + skipped, "mtp": r["mtp"]}
    out[("active counts the embedding table (37.6B for V3): the course's convention, DeepSeek's \"37B activated\", leaves it "
         "out, since a token reads one row of it and multiplies with none")] = {
        "total": r["total"], "active": r["active"] + emb, "mtp": r["mtp"]}
    out["active keeps every routed expert and counts the embedding table: active = total - skipped experts - embedding"] = {
        "total": r["total"], "active": r["total"], "mtp": r["mtp"]}
    out["active subtracts the gate too: the router runs for every token"] = {
        "total": r["total"], "active": r["active"] - n_moe * c.n_routed_experts * d, "mtp": r["mtp"]}
    out["mtp counts the shared embedding and head again: they belong to the main model"] = {
        "total": r["total"], "active": r["active"], "mtp": r["mtp"] + c.mtp_depth * 2 * emb}
    out["the MTP projection M_k is dim x 2 dim (it reads [hnorm(h) ; enorm(emb)])"] = {
        "total": r["total"], "active": r["active"], "mtp": r["mtp"] - c.mtp_depth * d * d}
    out["each MTP depth has three RMSNorms of its own (hnorm, enorm, norm)"] = {
        "total": r["total"], "active": r["active"], "mtp": r["mtp"] - c.mtp_depth * 3 * d}
    out["the MTP blocks are layers n_layers + k: MoE blocks unless n_dense_layers > n_layers + k"] = {
        "total": r["total"], "active": r["active"],
        "mtp": r["mtp"] - n_mtp_moe * (param_counts(c)["moe_per_layer"] - 3 * d * c.inter_dim)}
    out["total counts the MTP modules: DeepSeek reports them separately (671B + 14B MTP)"] = {
        "total": r["total"] + r["mtp"], "active": r["active"] + r["mtp"], "mtp": r["mtp"]}
    return out


def _check(got: dict, c: ModelConfig, label: str, keys: tuple[str, ...] = ("total", "active", "mtp")) -> None:
    assert_true(isinstance(got, dict) and set(keys) <= set(got),
                f"count_parameters should return a dict with {', '.join(map(repr, keys))}, got {type(got).__name__} "
                f"{sorted(got) if isinstance(got, dict) else ''}")
    want = param_counts(c)
    vals = {key: expect_int(got[key], f"count_parameters(...)[{key!r}]") for key in keys}
    if all(vals[key] == want[key] for key in vals):
        return
    for why, v in _variants(c).items():
        if all(vals[key] == v[key] for key in vals):
            shown = ", ".join(f"{key} {vals[key]:,} (expected {want[key]:,})" for key in vals)
            raise AssertionError(f"counts for {label}: {shown}\n  likely cause: {why}")
    bad = [f"{key} {vals[key]:,} (expected {want[key]:,})" for key in vals if vals[key] != want[key]]
    raise AssertionError(f"counts for {label}: {', '.join(bad)}\n  likely cause: "
                         + ("active = total - (n_routed - n_activated) experts in every MoE layer - the embedding table; shared "
                            "experts, the gate and the head always run"
                            if vals["total"] == want["total"] and vals["active"] != want["active"] else
                            "per depth: hnorm, enorm, norm (3 dim), proj (2 dim^2) and one block with layer_id n_layers + k"
                            if vals["total"] == want["total"] and "mtp" in vals else
                            "embedding + head + final norm + per block (2 norms, MLA, dense SwiGLU or gate + shared + routed experts)"))


def judge(k, t):
    count = k.g.count_parameters
    with t.part("visible checks: total and active of the default config against the modules of DeepSeekV3Mini(CFG)", 1):
        c0 = ModelConfig()
        _check(count(remote_cfg(k, c0)), c0, "the default config", keys=("total", "active"))
    with t.part("four more configs: no query compression, all dense, MTP depth 2, two shared experts with top-3", 2):
        for over in CASES:
            c = ModelConfig(**{**SMALL, "max_seq_len": 32, **over})
            _check(count(remote_cfg(k, c)), c, str(over))
    with t.part("DeepSeek-V3: 671,026,404,352 total, 36,625,603,584 active, the MTP module's 11.6B", 1):
        v3 = ModelConfig.v3()
        _check(count(remote_cfg(k, v3)), v3, "DeepSeek-V3")


MUTANTS = [
    Mutant("gate bias counted", "return 2 * d + attn + (moe[part] if", "return 2 * d + attn + (moe[part] + cfg.n_routed_experts if",
           expect="gate bias"),
    Mutant("embedding counted as active", "active = outside + sum(", "active = cfg.vocab_size * d + outside + sum(",
           expect="37B activated"),
    Mutant("head forgotten (tied)", "outside = cfg.vocab_size * d + d  #", "outside = d  #", expect="not tied"),
    Mutant("no rope key in wkv_a", "d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)", "d * cfg.kv_lora_rank", expect="k_pe"),
    Mutant("every routed expert active", 'sum(block(i, "active") for', "sum(block(i) for", expect="active keeps every routed expert"),
    Mutant("mtp counts embedding and head", "mtp = sum(3 * d + 2 * d * d + ", "mtp = sum(3 * d + 2 * d * d + 2 * cfg.vocab_size * d + ",
           expect="shared embedding and head again"),
    Mutant("final norm forgotten", "outside = cfg.vocab_size * d + d  #", "outside = cfg.vocab_size * d  #", expect="final RMSNorm"),
    Mutant("block norms forgotten", "return 2 * d + attn +", "return attn +", expect="two RMSNorms"),
    Mutant("MTP projection d x d", "mtp = sum(3 * d + 2 * d * d + ", "mtp = sum(3 * d + d * d + ", expect="dim x 2 dim"),
]

ALTERNATIVES = [
    Alternative("component by component", source='''
def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    ### BEGIN SOLUTION
    d = cfg.dim
    head_qk = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    if cfg.q_lora_rank:
        wq = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * head_qk  # wq_a, q_norm, wq_b
    else:
        wq = d * head_qk
    wkv_a = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv_norm = cfg.kv_lora_rank
    wkv_b = cfg.kv_lora_rank * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    wo = cfg.n_heads * cfg.v_head_dim * d
    mla = wq + wkv_a + kv_norm + wkv_b + wo
    swiglu = lambda width: 3 * d * width
    counts = {"total": 0, "active": 0, "mtp": 0}
    for layer in range(cfg.n_layers + cfg.mtp_depth):
        if cfg.is_moe_layer(layer):
            shared = swiglu(cfg.n_shared_experts * cfg.moe_inter_dim)
            gate = cfg.n_routed_experts * d
            ffn_total = gate + shared + cfg.n_routed_experts * swiglu(cfg.moe_inter_dim)
            ffn_active = gate + shared + cfg.n_activated_experts * swiglu(cfg.moe_inter_dim)
        else:
            ffn_total = ffn_active = swiglu(cfg.inter_dim)
        if layer < cfg.n_layers:
            counts["total"] += 2 * d + mla + ffn_total
            counts["active"] += 2 * d + mla + ffn_active
        else:
            counts["mtp"] += 3 * d + 2 * d * d + 2 * d + mla + ffn_total
    counts["total"] += 2 * cfg.vocab_size * d + d  # embedding, head, final norm
    counts["active"] += cfg.vocab_size * d + d  # a token multiplies the head, and reads one row of the embedding
    return counts
    ### END SOLUTION
'''),
]
