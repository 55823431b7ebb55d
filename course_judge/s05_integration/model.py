"""Exercise 5.2.2: DeepSeekV3Mini, its MTP forward and its loss."""

from __future__ import annotations

import math

import torch

from course_judge.checks import assert_true, expect_close, expect_tensor
from course_judge.local import Alternative, Mutant
from course_judge.s05_integration._common import INIT, cfg, close, load_weights, make_ref, remote_cfg
from course_judge.session import LearnerError
from course_lib.deepseek.model import DeepSeekV3Mini
from course_lib.deepseek.model_config import ModelConfig, masked_cross_entropy

GRADE_ID = "test_05_3_model"
POINTS = 7
ANSWERS = ("ex_05_3_model",)
SUMMARY = ("logits, main/MTP/balance/total losses and MTP logits against the reference in float64 (three configs, MTP depth "
           "0/1/2), targets not shifted twice, MTP on the token two ahead with the shared head, lambda, the final norm, "
           "gradients, causality")
REFERENCE = ("course_lib.deepseek.model",)

CASES = (dict(n_layers=2, n_dense_layers=1, mtp_depth=1), dict(n_layers=1, n_dense_layers=0, mtp_depth=2, q_lora_rank=0),
         dict(n_layers=2, n_dense_layers=2, mtp_depth=0))
SHIFTED_TWICE = ("the targets are shifted again: targets[:, t] already is the token after inputs[:, t] (the data shift "
                 "them once), so logits[:, t] is scored against targets[:, t]")
MTP_NEXT = ("the MTP logits are scored against the next token (t+1): depth k at position i predicts token i + k + 1, "
            "which is targets[:, i + k], so its targets are targets[:, k:]")
MTP_LAMBDA = "the MTP loss weight lambda (cfg.mtp_lambda) is missing: loss = main + mtp_lambda * mtp + aux"


def _logits(k, m, x):
    return expect_tensor(k.call_opts(m, (x,), {}, no_grad=True), "model(tokens)")


def _output(k, m, x, tg, name="compute_loss(inputs, targets)"):
    out = k.call_opts(m.compute_loss, (x, tg), {}, no_grad=True)
    assert_true(getattr(out, "type", None) == "ModelOutput", f"{name} should return a ModelOutput, got {type(out).__name__}")
    return out


@torch.no_grad()
def _reference(ref: DeepSeekV3Mini, x, tg) -> dict:
    """The reference's outputs and the outputs of the known wrong models, from its own parts."""
    c, ce, T = ref.cfg, masked_cross_entropy, x.shape[1]
    h, infos = ref.trunk(x)
    logits = ref.head(ref.norm(h))
    out = ref.compute_loss(x, tg)
    emb_scaled = ref.embed(x) * math.sqrt(c.dim)
    hs = emb_scaled
    for layer in ref.layers:
        hs, _ = layer(hs)
    logit_mistakes = {"the final RMSNorm is missing: logits = head(norm(h))": ref.head(h),
                      "the embedding is scaled by sqrt(dim): DeepSeek-V3 feeds Emb(t) to the first block as it is": ref.head(ref.norm(hs))}
    mtp_mistakes: list[dict] = [{} for _ in ref.mtp]
    hk_prev, hk_trunk = h, h
    for k_, mod in enumerate(ref.mtp, start=1):
        e = ref.embed(x[:, k_:])
        hk, _ = mod(hk_prev[:, : T - k_], e)
        mm = mtp_mistakes[k_ - 1]
        mm["the MTP logits skip the module's norm: head(mtp[k].norm(h^k))"] = ref.head(hk)
        mm["the MTP logits go through the main model's final norm: use the module's own norm, head(mtp[k].norm(h^k))"] = \
            ref.head(ref.norm(hk))
        mm["the MTP module reads Emb(t_i), the token at its own position: depth k reads the embedding of the token k "
           "ahead, embed(tokens[:, k:])"] = ref.head(mod.norm(mod(hk_prev[:, : T - k_], ref.embed(x[:, : T - k_]))[0]))
        mm["the MTP module reads the final-normed states: it reads the trunk's output h before self.norm"] = \
            ref.head(mod.norm(mod((ref.norm(h) if k_ == 1 else hk_prev)[:, : T - k_], e)[0]))
        if k_ > 1:
            mm["every depth reads the trunk's states: depth k + 1 reads depth k's output h^k"] = \
                ref.head(mod.norm(mod(hk_trunk[:, : T - k_], e)[0]))
        hk_prev = hk
    mtp_targets_next = [ce(lg, tg[:, : T - k_]) for k_, lg in enumerate(out.mtp_logits, start=1)]
    n = max(len(out.mtp_logits), 1)
    mtp_next = sum(mtp_targets_next, torch.zeros((), dtype=logits.dtype)) / n
    mtp_sum = out.mtp_loss * n
    main_aux = sum((i.aux_loss for i in infos), torch.zeros((), dtype=logits.dtype))
    lam = c.mtp_lambda
    return {
        "out": out, "logits": logits, "logit_mistakes": logit_mistakes, "mtp_mistakes": mtp_mistakes,
        "main_mistakes": {SHIFTED_TWICE: ce(logits[:, :-1], tg[:, 1:])},
        "mtp_mistakes_loss": ({MTP_NEXT: mtp_next, "the MTP losses are summed over depths: mtp_loss is their mean "
                               "(the total adds (lambda / D) * sum_k)": mtp_sum} if c.mtp_depth else {}),
        "aux_mistakes": ({"only the main blocks' balance losses are added: the MTP blocks' MoE layers count too": main_aux}
                         if c.mtp_depth and len(infos) < len(out.infos) else {}),
        "loss_mistakes": {MTP_LAMBDA: out.main_loss + out.mtp_loss + out.aux_loss,
                          "the balance losses are missing from the total: loss = main + mtp_lambda * mtp + aux":
                              out.main_loss + lam * out.mtp_loss,
                          "the MTP loss is divided by D again: mtp_loss is already the mean over depths":
                              out.main_loss + lam * out.mtp_loss / n + out.aux_loss if n > 1 else out.loss * float("nan")},
    }


class _Want:
    """The reference's outputs; the known wrong models' outputs only when an answer differs."""

    def __init__(self, ref: DeepSeekV3Mini, x: torch.Tensor, tg: torch.Tensor):
        self.ref, self.x, self.tg = ref, x, tg
        with torch.no_grad():
            self.out = ref.compute_loss(x, tg)
        self.logits = self.out.logits
        self._mistakes = None

    def __getitem__(self, key: str):
        if key == "out":
            return self.out
        if key == "logits":
            return self.logits
        if self._mistakes is None:
            self._mistakes = _reference(self.ref, self.x, self.tg)
        return self._mistakes[key]

    def lazy(self, key: str, index: int | None = None):
        return lambda: self[key] if index is None else self[key][index]


def _pair(k, c: ModelConfig, seed: int):
    k.seed(seed)
    m = k.g.DeepSeekV3Mini(remote_cfg(k, c))
    torch.manual_seed(seed)
    ref = make_ref(DeepSeekV3Mini(c), 7)
    info = k.info(m)
    n_layers = sum(1 for n in info.get("parameters", {}) if n.startswith("layers.") and n.endswith(".attn_norm.weight"))
    n_mtp = sum(1 for n in info.get("parameters", {}) if n.startswith("mtp.") and n.endswith(".hnorm.weight"))
    assert_true(n_layers == c.n_layers and n_mtp == c.mtp_depth,
                f"expected {c.n_layers} layers and {c.mtp_depth} MTP modules, got {n_layers} and {n_mtp}",
                hint="layers = ModuleList(TransformerBlock(i, cfg) for i < n_layers); mtp = ModuleList(MTPModule(n_layers + k, cfg) "
                     "for k < mtp_depth)")
    load_weights(k, m, ref, "DeepSeekV3Mini")
    return m, ref


def judge(k, t):
    with t.part("visible checks: logits shape, causality, a ModelOutput with (2, 9, vocab) MTP logits, loss near ln(vocab), "
                "loss = main + lambda mtp + aux", 2):
        c0 = ModelConfig()
        k.seed(0)
        m = k.g.DeepSeekV3Mini(remote_cfg(k, c0))
        k.call(k.lib(INIT), m, seed=0)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, c0.vocab_size, (2, 10), generator=g)
        lg = _logits(k, m, x)
        expect_tensor(lg, "logits", shape=(2, 10, c0.vocab_size))
        y = x.clone()
        y[:, 6:] = (y[:, 6:] + 1) % c0.vocab_size
        expect_close(_logits(k, m, y)[:, :6], lg[:, :6], atol=1e-5, name="logits before position 6 after changing tokens 6..9",
                     hint="future tokens must never change past logits (causal attention in every block)")
        tt = torch.randint(0, c0.vocab_size, (2, 10), generator=g)
        out = _output(k, m, x, tt)
        assert_true(len(out.mtp_logits) == 1, f"one MTP depth: mtp_logits should hold 1 tensor, got {len(out.mtp_logits)}")
        expect_tensor(out.mtp_logits[0], "depth-1 MTP logits", shape=(2, 9, c0.vocab_size),
                      hint="depth k has T - k positions: position i predicts token i + k + 1; T - k - 1 positions usually "
                           "means the MTP reads the embedding of the token it predicts (t_{i+k+1}): a look-ahead leak")
        ml = float(out.main_loss)
        assert_true(abs(ml - math.log(c0.vocab_size)) < 0.5,
                    f"at initialisation the main loss should be near ln(vocab) = {math.log(c0.vocab_size):.2f}, got {ml:.2f}")
        expect_close(out.loss, out.main_loss + c0.mtp_lambda * out.mtp_loss + out.aux_loss, atol=1e-6, name="total loss",
                     mistakes={MTP_LAMBDA: out.main_loss + out.mtp_loss + out.aux_loss})

    g = torch.Generator().manual_seed(31)
    pairs, outputs = [], []
    with t.part("logits against the reference in float64: dense + MoE + MTP, all MoE with MTP depth 2, all dense without MTP", 2):
        for i, over in enumerate(CASES):
            c = cfg(**over)
            m, ref = _pair(k, c, 40 + i)
            x = torch.randint(0, c.vocab_size, (3, 11), generator=g)
            tg = torch.randint(0, c.vocab_size, (3, 11), generator=g)
            tg[0, :4] = -100  # ignored positions
            want = _Want(ref, x, tg)
            close(_logits(k, m, x), want["logits"], atol=1e-10, name=f"logits ({over})", mistakes=want.lazy("logit_mistakes"),
                         hint="embed -> blocks -> final norm -> head")
            pairs.append((c, m, ref, x, tg, want))

    with t.part("losses: main (targets as given, IGNORE_INDEX skipped), MTP (two ahead, mean over depths), balance "
                "(every MoE layer), total = main + lambda mtp + aux", 1):
        assert_true(len(pairs) == 3, "the logits must match the reference first (previous part)")
        for c, m, _, x, tg, want in pairs:
            o, r = _output(k, m, x, tg), want["out"]
            outputs.append(o)
            close(o.main_loss, r.main_loss, atol=1e-10, name="main loss", mistakes=want.lazy("main_mistakes"),
                         hint="cross-entropy of the flattened logits against targets, ignore_index=IGNORE_INDEX")
            close(o.mtp_loss, r.mtp_loss, atol=1e-10, name=f"MTP loss (depth {c.mtp_depth})",
                  mistakes=want.lazy("mtp_mistakes_loss"),
                         hint="depth k's targets are targets[:, k:]; average over the depths (0 when mtp_depth == 0)")
            close(o.aux_loss, r.aux_loss, atol=1e-12, name="balance loss", mistakes=want.lazy("aux_mistakes"),
                         hint="sum the aux_loss of every RoutingInfo, MTP blocks included")
            close(o.loss, r.loss, atol=1e-10, name="total loss", mistakes=want.lazy("loss_mistakes"),
                         hint="main + mtp_lambda * mtp + aux")
        # an independent oracle for the MTP target: targets = next tokens, so depth 1 at position i predicts inputs[i + 2]
        c, m, ref, x, _, _ = pairs[0]
        tg = torch.cat([x[:, 1:], torch.full((x.shape[0], 1), -100)], 1)
        o = _output(k, m, x, tg)
        lg = expect_tensor(o.mtp_logits[0], "depth-1 MTP logits", shape=(x.shape[0], x.shape[1] - 1, c.vocab_size))
        expect_close(o.mtp_loss, masked_cross_entropy(lg[:, :-1], x[:, 2:]), atol=1e-10, name="MTP loss against the token two ahead",
                     mistakes={MTP_NEXT: masked_cross_entropy(lg, x[:, 1:])}, hint="depth 1 at position i predicts inputs[i + 2]")

    with t.part("MTP logits: the shared head and embedding, depth k + 1 reading depth k, T - k positions; routing infos "
                "main blocks first", 1):
        assert_true(len(pairs) == 3, "the logits must match the reference first")
        for i, (c, m, _, x, tg, want) in enumerate(pairs):
            o, r = outputs[i] if i < len(outputs) else _output(k, m, x, tg), want["out"]
            assert_true(len(o.mtp_logits) == c.mtp_depth, f"{c.mtp_depth} MTP depths expected, got {len(o.mtp_logits)}")
            T = x.shape[1]
            for d, (a, b) in enumerate(zip(o.mtp_logits, r.mtp_logits), start=1):
                expect_tensor(a, f"MTP logits at depth {d}")
                assert_true(tuple(a.shape) == tuple(b.shape),
                            f"MTP logits at depth {d} have shape {tuple(a.shape)}, expected {tuple(b.shape)} (T - k = {T - d} positions)",
                            hint=f"depth k reads h[:, :T-k] and embed(tokens[:, k:]); {T - d - 1} positions usually means the "
                                 "MTP reads the embedding of the token it predicts (t_{i+k+1}): a look-ahead leak")
                close(a, b, atol=1e-10, name=f"MTP logits at depth {d}", mistakes=want.lazy("mtp_mistakes", d - 1),
                             hint="depth k: h^k = mtp[k-1](h^(k-1)[:, :T-k], embed(tokens[:, k:])), logits head(mtp[k-1].norm(h^k))")
            assert_true(len(o.infos) == len(r.infos), f"one RoutingInfo per MoE layer ({len(r.infos)}), got {len(o.infos)}",
                        hint="the MTP blocks' routing infos come after the main blocks'")
            for a, b in zip(o.infos, r.infos):
                assert_true(torch.equal(a.load, b.load), "infos must list the main blocks' MoE layers first, then the MTP blocks'")
        c, m, ref, x, tg, _ = pairs[1]  # depth 2: zero the model's head, every MTP logit must vanish
        k.call_opts(m.head.weight.zero_, no_grad=True)
        o = _output(k, m, x, tg)
        assert_true(all(float(lg.abs().max()) == 0 for lg in o.mtp_logits),
                    "the MTP logits must come from the model's shared head (self.head), not from a head of their own")

    with t.part("gradients: every parameter gets the reference's gradient of the loss; the MTP loss trains the trunk; "
                "a float input raises ValueError; no balance loss in eval mode", 1):
        assert_true(len(pairs) == 3, "the logits must match the reference first")
        c, m, ref, x, tg, _ = pairs[0]
        for what in ("mtp_loss", "loss"):
            kept = k.call_opts(m.compute_loss, (x, tg), {}, keep=True)
            got = k.grad(k.lib("builtins:getattr"), kept, what, wrt=[], params=m)
            ref.zero_grad()
            getattr(ref.compute_loss(x, tg), what).backward()
            if what == "mtp_loss":
                gw = got.param_grads.get("layers.0.attn.wkv_a.weight")
                assert_true(gw is not None and float(gw.abs().sum()) > 0,
                            "the MTP loss does not reach the main model: do not detach h before the MTP modules")
            for n, p in ref.named_parameters():
                if p.grad is not None and float(p.grad.abs().max()) > 0:
                    assert_true(n in got.param_grads, f"no gradient of the {what} for {n}")
                    expect_close(got.param_grads[n], p.grad, atol=1e-9, name=f"gradient of the {what} for {n}")
        try:
            k.call_opts(m, (torch.randn(2, 5),), {}, no_grad=True)
            raised = None
        except LearnerError as e:
            raised = e.type
        assert_true(raised == "ValueError", f"model(float tensor) should raise ValueError, got {raised or 'no error'}",
                    hint="keep the given self.check_tokens(tokens, start_pos) call at the top of trunk")
        k.call(m.eval)
        o = _output(k, m, x, tg)
        assert_true(float(o.aux_loss) == 0.0, "in eval mode the MoE adds no balance loss: add the infos' aux_loss, nothing else")


# the MTP branch reading the token it predicts (Emb(t_{i+k+1})): a causality off-by-one, in mtp_forward and the loss
_LEAK_OLD = """            h, info = module(h[:, : T - k], self.embed(tokens[:, k:]))  # (B, T - k, dim)
            logits.append(self.head(module.norm(h)))  # (B, T - k, vocab): the shared head
            if info is not None:
                infos.append(info)
        return logits, infos
        ### END SOLUTION

    def compute_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> ModelOutput:
        \"\"\"``loss = main + (mtp_lambda / D) * sum_k mtp_k + sum of the MoE layers' aux_loss`` (V3 eqs. 17-20, 25).

        inputs, targets: (B, T). Returns ``ModelOutput(loss, main_loss, mtp_loss, aux_loss, logits, mtp_logits,
        infos)`` where ``mtp_loss`` is the mean over depths (0 when ``mtp_depth == 0``) and ``infos`` lists the
        main blocks' routing infos, then the MTP blocks'.
        \"\"\"
        self.check_tokens(inputs)
        ### BEGIN SOLUTION
        V = self.cfg.vocab_size
        h, infos = self.trunk(inputs)
        logits = self.head(self.norm(h))  # (B, T, vocab)
        main = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        mtp_logits, mtp_infos = self.mtp_forward(h, inputs)
        mtp = main.new_zeros(())
        for k, lg in enumerate(mtp_logits, start=1):
            mtp = mtp + F.cross_entropy(lg.reshape(-1, V), targets[:, k:].reshape(-1), ignore_index=IGNORE_INDEX)"""

MUTANTS = [
    Mutant("final norm missing", "        return self.head(self.norm(h))  # (B, T, vocab)\n",
           "        return self.head(h)  # (B, T, vocab)\n", expect="final RMSNorm is missing"),
    Mutant("labels shifted twice",
           "main = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX)",
           "main = F.cross_entropy(logits[:, :-1].reshape(-1, V), targets[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)",
           expect="shifted again"),
    Mutant("MTP scored against t+1", "targets[:, k:].reshape(-1)", "targets[:, : targets.shape[1] - k].reshape(-1)",
           expect="scored against the next token (t+1)"),
    Mutant("MTP reads Emb(t_i)", "module(h[:, : T - k], self.embed(tokens[:, k:]))",
           "module(h[:, : T - k], self.embed(tokens[:, : T - k]))",
           expect="reads Emb(t_i)"),
    Mutant("MTP lambda missing", "main + self.cfg.mtp_lambda * mtp + aux", "main + mtp + aux", expect="lambda"),
    Mutant("MTP losses summed", "        mtp = mtp / max(len(mtp_logits), 1)\n", "", expect="summed over depths"),
    Mutant("MTP without its norm", "logits.append(self.head(module.norm(h)))", "logits.append(self.head(h))",
           expect="skip the module's norm"),
    Mutant("MTP head not shared", "        self.mtp = nn.ModuleList(",
           "        self.mtp_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)\n        self.mtp = nn.ModuleList(",
           expect="share the model's embedding and output head"),
    Mutant("every depth reads the trunk",
           "            h, info = module(h[:, : T - k], self.embed(tokens[:, k:]))  # (B, T - k, dim)\n"
           "            logits.append(self.head(module.norm(h)))",
           "            hk, info = module(h[:, : T - k], self.embed(tokens[:, k:]))  # (B, T - k, dim)\n"
           "            logits.append(self.head(module.norm(hk)))", expect="every depth reads the trunk"),
    Mutant("MTP blocks' balance loss missing", "        infos = infos + mtp_infos\n        aux = sum(",
           "        aux = sum(", expect="MTP blocks' MoE layers count too"),
    Mutant("h detached for MTP", "self.mtp_forward(h, inputs)", "self.mtp_forward(h.detach(), inputs)", expect="detach h"),
    Mutant("MTP look-ahead leak", _LEAK_OLD, _LEAK_OLD.replace("module(h[:, : T - k], self.embed(tokens[:, k:]))",
           "module(h[:, : T - k - 1], self.embed(tokens[:, k + 1:]))").replace("targets[:, k:]", "targets[:, k + 1:]"),
           expect="look-ahead leak"),
]

ALTERNATIVES = [
    Alternative("explicit masks and a loop over depths", source='''
class DeepSeekV3Mini(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ### BEGIN SOLUTION
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([TransformerBlock(i, cfg) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList([MTPModule(cfg.n_layers + k, cfg) for k in range(cfg.mtp_depth)])
        ### END SOLUTION

    def check_tokens(self, tokens, start_pos=0):
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor of shape (B, T), got {tuple(tokens.shape)} {tokens.dtype}")
        if start_pos + tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start_pos + tokens.shape[1]} exceed max_seq_len {self.cfg.max_seq_len}")

    def trunk(self, tokens, start_pos=0, caches=None, *, absorb=False):
        self.check_tokens(tokens, start_pos)
        ### BEGIN SOLUTION
        x = self.embed(tokens)
        infos = []
        for i in range(len(self.layers)):
            x, info = self.layers[i](x, start_pos, caches[i] if caches is not None else None, absorb=absorb)
            infos += [] if info is None else [info]
        return x, infos
        ### END SOLUTION

    def forward(self, tokens, start_pos=0, caches=None, *, absorb=False):
        ### BEGIN SOLUTION
        return self.head(self.norm(self.trunk(tokens, start_pos, caches, absorb=absorb)[0]))
        ### END SOLUTION

    def mtp_forward(self, h, tokens):
        ### BEGIN SOLUTION
        out, infos = [], []
        for k in range(1, len(self.mtp) + 1):
            mod = self.mtp[k - 1]
            h, info = mod(h[:, :-1], self.embed(tokens[:, k:]))  # each depth is one position shorter
            out.append(self.head(mod.norm(h)))
            if info is not None:
                infos.append(info)
        return out, infos
        ### END SOLUTION

    def compute_loss(self, inputs, targets):
        self.check_tokens(inputs)
        ### BEGIN SOLUTION
        def ce(lg, tg):
            keep = tg != IGNORE_INDEX
            return F.cross_entropy(lg[keep].double(), tg[keep]).to(lg.dtype)

        h, infos = self.trunk(inputs)
        logits = self.head(self.norm(h))
        main = ce(logits, targets)
        mtp_logits, mtp_infos = self.mtp_forward(h, inputs)
        losses = [ce(lg, targets[:, k:]) for k, lg in enumerate(mtp_logits, start=1)]
        mtp = torch.stack(losses).mean() if losses else torch.zeros((), dtype=main.dtype)
        infos = [*infos, *mtp_infos]
        aux = torch.zeros((), dtype=main.dtype)
        for info in infos:
            aux = aux + info.aux_loss
        loss = main + self.cfg.mtp_lambda * mtp + aux
        return ModelOutput(loss, main, mtp, aux, logits, mtp_logits, infos)
        ### END SOLUTION

    def moe_layers(self):
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

    @torch.no_grad()
    def update_biases(self, loads):
        for moe, load in zip(self.moe_layers(), loads, strict=True):
            moe.update_bias(load)

    def num_parameters(self, active=False):
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("mtp."))
        if active:
            for b in self.layers:
                if isinstance(b.ffn, MoE):
                    per_expert = sum(p.numel() for p in b.ffn.experts[0].parameters())
                    n -= (b.ffn.cfg.n_routed_experts - b.ffn.cfg.n_activated_experts) * per_expert
        return n
'''),
]
