"""Exercise 5.2.4: greedy generation over the latent cache, on MLA's absorbed path."""

from __future__ import annotations

import torch

from course_judge.checks import assert_true, expect_tensor
from course_judge.local import Alternative, Mutant
from course_judge.s05_integration._common import INIT, cfg, load_weights, remote_cfg
from course_judge.session import LearnerError
from course_lib.deepseek.model import DeepSeekV3Mini
from course_lib.deepseek.model_config import ModelConfig, init_weights

GRADE_ID = "test_05_5_generate"
POINTS = 4
ANSWERS = ("ex_05_5_generate",)
SUMMARY = ("greedy tokens against the reference on the same weights (absorbed, naive, no cache), decode positions, one cache "
           "per layer; FLOPs of one cached absorbed decode (no recompute), eval mode while decoding, the mode restored")
REFERENCE = ("course_lib.deepseek.model",)


@torch.no_grad()
def _variant(ref: DeepSeekV3Mini, prompt: torch.Tensor, n: int, *, offset: int = 0, shared: bool = False) -> torch.Tensor:
    """A wrong decoder on the reference model: decode positions shifted by ``offset``, or one cache for every layer."""
    B, T0 = prompt.shape
    caches = [ref.layers[0].attn.new_cache(B, T0 + n)] * len(ref.layers) if shared else ref.new_caches(B, T0 + n)
    tokens = prompt
    logits = ref(prompt, 0, caches, absorb=True)[:, -1]
    for step in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        if step + 1 < n:
            logits = ref(nxt, T0 + step + offset, caches, absorb=True)[:, -1]
    return tokens


_FLOP_PROMPT = torch.tensor([[3, 1, 4, 1, 5]])
_FLOP_STEPS = 5


def _dense_ref(c: ModelConfig) -> DeepSeekV3Mini:
    torch.manual_seed(3)
    return init_weights(DeepSeekV3Mini(c), 3, std=0.4).double()


def _expected_flops(k, md, tokens: torch.Tensor) -> dict[str, int]:
    """FLOPs of decoding ``tokens`` with the learner's own (checked) model, call by call, in the kernel: the prefill and one
    position per step over a latent cache (absorbed and naive), or the whole sequence at every step (recompute)."""
    T0, total = _FLOP_PROMPT.shape[1], tokens.shape[1]
    out = {}
    for name, absorb in (("absorbed", True), ("naive", False)):
        cache = k.call_opts(md.layers[0].attn.new_cache, (1, total), keep=True)
        n = k.profile(md, tokens[:, :T0], 0, [cache], absorb=absorb).flops
        for pos in range(T0, total - 1):
            n += k.profile(md, tokens[:, pos:pos + 1], pos, [cache], absorb=absorb).flops
        out[name] = n
    out["recompute"] = sum(k.profile(md, tokens[:, :end]).flops for end in range(T0, total))
    return out


def _generate(k, m, *args, **kw) -> torch.Tensor:
    try:
        out = k.call_opts(m.generate, args, kw, no_grad=True)
    except LearnerError as e:
        if "would leave a hole" in e.message:
            raise AssertionError(f"a decode step is fed at the wrong position (the cache says: {e.message})\n  likely cause: "
                                 "the first new token sits at position T0, so step s feeds its token at start_pos = T0 + step") from None
        raise
    return expect_tensor(out, "generate(prompt, n)")


def judge(k, t):
    with t.part("visible checks: shape, the prompt kept, cached absorbed tokens equal re-running the whole sequence", 1):
        c0 = ModelConfig()
        k.seed(0)
        m = k.g.DeepSeekV3Mini(remote_cfg(k, c0))
        k.call(k.lib(INIT), m, seed=1, std=0.3)
        p = torch.randint(0, c0.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
        a = _generate(k, m, p, 6)
        expect_tensor(a, "generated tokens", shape=(2, 10))
        assert_true(torch.equal(a[:, :4], p), "the output starts with the prompt")
        assert_true(torch.equal(a, _generate(k, m, p, 6, use_cache=False)),
                    "cached absorbed decoding must produce the same greedy tokens as re-running the whole sequence",
                    hint="feed each new token at position T0 + step, with the same caches you prefilled")

    c = cfg(n_layers=2, n_dense_layers=1, q_lora_rank=0, max_seq_len=24)
    p = torch.randint(0, c.vocab_size, (3, 5), generator=torch.Generator().manual_seed(41))
    built = []
    with t.part("greedy tokens equal the reference model's on the same weights: absorbed, naive over the latent cache, "
                "no cache", 2):
        k.seed(9)
        m = k.g.DeepSeekV3Mini(remote_cfg(k, c))
        torch.manual_seed(9)
        ref = init_weights(DeepSeekV3Mini(c), 9, std=0.4).double()
        load_weights(k, m, ref, "DeepSeekV3Mini")
        built.append(m)
        want = ref.generate(p, 6)
        got = _generate(k, m, p, 6)
        if not torch.equal(got, want):
            for why, v in (("a decode step is fed at the wrong position: step s feeds its token at start_pos = T0 + step",
                            _variant(ref, p, 6, offset=-1)),
                           ("one cache is shared by all layers: each layer needs its own, "
                            "[layer.attn.new_cache(B, T0 + max_new_tokens) for layer in self.layers]", _variant(ref, p, 6, shared=True))):
                assert_true(not torch.equal(got, v), "greedy tokens differ from the reference model on the same weights", hint=why)
            raise AssertionError("greedy tokens differ from the reference model on the same weights\n  likely cause: prefill the prompt "
                                 "at position 0, take its last logits, then feed each new token alone at T0 + step")
        assert_true(torch.equal(_generate(k, m, p, 6, absorb=False), want), "absorb=False (the naive path over the latent cache) "
                    "must give the same tokens", hint="pass absorb to every call of the model")
        assert_true(torch.equal(_generate(k, m, p, 6, use_cache=False), want), "use_cache=False must give the same tokens",
                    hint="without a cache, re-run self(tokens) on the whole sequence at every step")

    with t.part("one generate call costs what cached absorbed decoding costs (FLOPs: no recompute, the absorbed path); eval mode "
                "while decoding, the training mode restored", 1):
        assert_true(built, "the model must load the reference's weights first (previous part)")
        m = built[0]
        # FLOPs on a one-layer dense model (the MoE's many small operations would only slow the counting down)
        cd = cfg(n_layers=1, n_dense_layers=1, q_lora_rank=0, mtp_depth=0, max_seq_len=24)
        k.seed(3)
        md = k.g.DeepSeekV3Mini(remote_cfg(k, cd))
        load_weights(k, md, _dense_ref(cd), "DeepSeekV3Mini")
        got = k.profile(md.generate, _FLOP_PROMPT, _FLOP_STEPS).flops
        want = _expected_flops(k, md, _generate(k, md, _FLOP_PROMPT, _FLOP_STEPS))
        nearest = min(want, key=lambda w: abs(got - want[w]))
        assert_true(nearest != "recompute", f"generate did {got:,} FLOPs, re-running the whole sequence costs {want['recompute']:,} "
                    f"and cached decoding {want['absorbed']:,}: it re-runs the whole sequence at every step",
                    hint="after the prefill, feed only the newest token, at its position, with the caches")
        assert_true(nearest != "naive" or want["naive"] == want["absorbed"],
                    f"generate did {got:,} FLOPs, the naive path's count ({want['naive']:,}), not the absorbed one's "
                    f"({want['absorbed']:,}): absorb does not reach the attention", hint="pass absorb=absorb to every call of the model")
        assert_true(got <= 1.25 * want["absorbed"], f"generate did {got:,} FLOPs, cached absorbed decoding needs {want['absorbed']:,}",
                    hint="prefill once, then one position per step through every layer")
        # while decoding the MoE must not be in training mode: make its training-only branch fail loudly for a moment
        moes = [m.layers[i].ffn for i in range(c.n_layers) if c.is_moe_layer(i)] + [m.mtp[j].block.ffn for j in range(c.mtp_depth)]
        k.call(m.train)
        for moe in moes:
            k.set(moe.cfg.seq_aux_alpha, "probe: the model is in training mode")
        try:
            _generate(k, m, p, 2)
            in_train = False
        except LearnerError as e:
            in_train = "probe" in e.message or e.type == "TypeError"
        finally:
            for moe in moes:
                k.set(moe.cfg.seq_aux_alpha, c.seq_aux_alpha)
        assert_true(not in_train, "generate ran the model in training mode: decoding runs in eval mode (no balance loss, no routing "
                    "statistics)", hint="self.eval() before decoding")
        assert_true(k.get(m.training) is True, "generate must restore the model's training mode",
                    hint="self.train(was_training) at the end")
        k.call(m.eval)
        _generate(k, m, p, 2)
        assert_true(k.get(m.training) is False, "generate must restore the mode the model was in (eval here), not switch it to training",
                    hint="remember was_training = self.training first")


MUTANTS = [
    Mutant("whole sequence re-fed", "logits = self(nxt, T0 + step, caches, absorb=absorb)[:, -1]", "logits = self(tokens)[:, -1]",
           expect="re-runs the whole sequence"),
    Mutant("decode position + 1", "self(nxt, T0 + step, caches", "self(nxt, T0 + step + 1, caches", expect="wrong position"),
    Mutant("decode position - 1", "self(nxt, T0 + step, caches", "self(nxt, T0 + step - 1, caches", expect="wrong position"),
    Mutant("absorb dropped", ", absorb=absorb)", ")", count=2, expect="absorb does not reach"),
    Mutant("no eval mode", "    self.eval()\n", "", expect="training mode: decoding runs in eval mode"),
    Mutant("mode not restored", "    self.train(was_training)\n", "", expect="restore"),
    Mutant("one cache for all layers", "caches = [layer.attn.new_cache(B, T0 + max_new_tokens) for layer in self.layers]",
           "caches = [self.layers[0].attn.new_cache(B, T0 + max_new_tokens)] * len(self.layers)", expect="one cache is shared"),
]

ALTERNATIVES = [
    Alternative("a position loop with try/finally", source='''
@add_to_class(DeepSeekV3Mini)
@torch.no_grad()
def generate(self, prompt, max_new_tokens, *, absorb=True, use_cache=True):
    self.check_tokens(prompt)
    B, T0 = prompt.shape
    if T0 + max_new_tokens > self.cfg.max_seq_len:
        raise ValueError(f"prompt + new tokens = {T0 + max_new_tokens} exceeds max_seq_len {self.cfg.max_seq_len}")
    ### BEGIN SOLUTION
    mode = self.training
    self.train(False)
    try:
        out = prompt.clone()
        if not use_cache:
            for _ in range(max_new_tokens):
                out = torch.cat([out, self(out)[:, -1:].argmax(dim=-1)], dim=1)
            return out
        caches = [blk.attn.new_cache(B, T0 + max_new_tokens) for blk in self.layers]
        logits = self(prompt, 0, caches, absorb=absorb)
        for pos in range(T0, T0 + max_new_tokens):
            nxt = logits[:, -1:].argmax(dim=-1)  # (B, 1)
            out = torch.cat([out, nxt], dim=1)
            if pos + 1 < T0 + max_new_tokens:
                logits = self(nxt, pos, caches, absorb=absorb)
        return out
    finally:
        self.train(mode)
    ### END SOLUTION
'''),
]
