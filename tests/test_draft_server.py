"""The test-writing exercises' drafts run on the judge's side; the kernel's stand-ins behave like them and say nothing more.

Each stand-in (course_lib.drafts.stand_ins) is checked against the draft it stands for: values and types, defaults,
errors, a module's parameters, forward and backward. What the kernel is told (the specs) may differ between drafts only
where any implementation shows it from outside. The server refuses what it must not compute.
"""

from __future__ import annotations

import contextlib
import inspect
import socket
import time

import pytest
import torch

from course_judge import drafts
from course_judge.draft_server import MAX_CONNECTIONS, DraftServer
from course_judge.s01_foundations import kv_cache
from course_judge.s03_moe import expert_test
from course_judge.s06_production import router_test
from course_lib import wire
from course_lib.drafts import recv_message, send_message, stand_ins

JUDGES = {"kv_cache": kv_cache.DRAFTS, "expert": expert_test.DRAFTS, "router": router_test.DRAFTS}


def _served(d: drafts.Drafts):
    built = drafts.build(d)
    tokens = {f"tok{i}": n for i, n in enumerate(built)}
    server = DraftServer({t: built[n] for t, n in tokens.items()})
    return built, tokens, server


def _same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a, b)
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert type(a) is type(b) and a == b, (a, b)


def _outcome(fn, *args, **kwargs):
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the type of what was raised is compared
        return "raised", type(e)


def test_kv_stand_ins_answer_as_their_drafts():
    built, tokens, server = _served(kv_cache.DRAFTS)
    calls = [((61, 128, 128, 4096), {}), ((3, 5, 7, 11, 13, 4), {}), ((2, 3, 5, 7), {"bytes_per_elem": 1}),
             ((10**6, 2, 3, 4), {}), ((2, 3), {}), ((2.5, 3, 4, 5), {})]
    with server:
        stand = dict(zip(tokens, stand_ins(server.path, server.specs(list(tokens)))))
        for t, n in tokens.items():
            assert inspect.signature(stand[t]) == inspect.signature(built[n]), n
            assert stand[t].__name__ == built[n].__name__
            for args, kw in calls:
                want, got = _outcome(built[n], *args, **kw), _outcome(stand[t], *args, **kw)
                assert want[0] == got[0], (n, args)
                _same(want[1], got[1]) if want[0] == "ok" else None
        assert server.requests >= len(tokens) * len(calls)


def test_router_stand_ins_answer_as_their_drafts():
    built, tokens, server = _served(router_test.DRAFTS)
    g = torch.Generator().manual_seed(5)
    logits, bias = torch.randn(12, 16, generator=g), torch.randn(16, generator=g)
    kw = dict(top_k=4, n_groups=4, n_limited_groups=2, route_scale=2.5)
    with server:
        stand = dict(zip(tokens, stand_ins(server.path, server.specs(list(tokens)))))
        for t, n in tokens.items():
            _same(built[n](logits, bias, **kw), stand[t](logits, bias, **kw))
            _same(built[n](logits.double(), None, **kw), stand[t](logits.double(), None, **kw))
            with pytest.raises(TypeError):
                stand[t](logits, bias)  # the keywords are required, as in the draft


@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 8)])
def test_expert_stand_ins_compute_forward_and_backward_as_their_drafts(shape):
    built, tokens, server = _served(expert_test.DRAFTS)
    with server:
        stand = dict(zip(tokens, stand_ins(server.path, server.specs(list(tokens)))))
        for t, n in tokens.items():
            torch.manual_seed(1)
            real = built[n](8, 5)
            torch.manual_seed(1)
            fake = stand[t](8, 5)  # the same layers in the same order: the same weights from the same seed
            assert [(k, v.shape) for k, v in real.named_parameters()] == [(k, v.shape) for k, v in fake.named_parameters()]
            for a, b in zip(real.parameters(), fake.parameters()):
                assert torch.equal(a, b), n
            x = torch.randn(*shape, dtype=torch.float64 if "float64" in n else torch.float32)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = real(xa), fake(xb)
            torch.testing.assert_close(yb, ya, rtol=0, atol=0)
            g = torch.randn_like(ya)
            ya.backward(g)
            yb.backward(g)
            torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)
            for (k, a), b in zip(real.named_parameters(), fake.parameters()):
                torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=f"{n}: {k}")
            with torch.no_grad():
                fake.w1.weight.zero_()
                real.w1.weight.zero_()
                torch.testing.assert_close(fake(x.float()), real(x.float()), rtol=0, atol=0)  # the kernel's weights count
            got, want = _outcome(fake, x.long()), _outcome(real, x.long())  # an integer input: raises, or not, alike
            assert got[0] == want[0], n
            _same(got[1], want[1])


def _without_token(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "token"}


@pytest.mark.parametrize("which", list(JUDGES))
def test_the_kernel_learns_only_what_a_draft_shows_from_outside(which):
    d = JUDGES[which]
    built, tokens, server = _served(d)
    specs = {tokens[s["token"]]: _without_token(s) for s in server.specs(list(tokens))}
    assert all(set(s) <= {"kind", "name", "params", "linears"} for s in specs.values())
    base = specs[next(iter(d.correct))]
    differ = {n for n, s in specs.items() if s != base}
    assert not differ & set(d.correct), "correct drafts look different from outside"
    # only a changed default (visible in the signature) or biases (visible as parameters) may show
    of = drafts.variants(d)
    shows = {"kv_cache": {n for n, (_, sw) in of.items() if {"default_batch", "default_bytes"} & set(sw)},
             "expert": {n for n, (_, sw) in of.items() if sw.get("bias")}, "router": set()}[which]
    assert differ == shows
    words = set(_strings(specs))
    for _, sw in of.values():
        assert not set(sw) & words, f"a switch reaches the kernel: {set(sw) & words}"


@pytest.mark.parametrize("which", list(JUDGES))
def test_each_mistake_is_planted_in_every_correct_way_of_writing_it(which):
    """Drafts agree in groups of one size, so agreeing with other drafts says nothing about being correct."""
    d = JUDGES[which]
    of = drafts.variants(d)
    groups = {}
    for base, _ in of.values():
        groups[base] = groups.get(base, 0) + 1
    assert set(groups) == set(d.correct) | set(d.wrong)
    assert all(groups[w] == len(d.correct) for w in d.wrong), groups
    assert all(groups[c] == 1 for c in d.correct)


def _strings(v):
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from _strings(k)
            yield from _strings(x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _strings(x)


def _ask(path: str, req) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        send_message(s, req if isinstance(req, bytes) else wire.dumps(req))
        return wire.loads(recv_message(s))


def test_the_server_refuses_what_it_must_not_compute():
    built, tokens, server = _served(expert_test.DRAFTS)
    t = next(iter(tokens))
    layer = {"w1.weight": torch.zeros(5, 8), "w2.weight": torch.zeros(8, 5), "w3.weight": torch.zeros(5, 8)}
    with server:
        assert "no such draft" in _ask(server.path, {"token": "guess", "op": "forward"})["error"]["message"]
        assert "unknown operation" in _ask(server.path, {"token": t, "op": "call", "args": [], "kwargs": {}})["error"]["message"]
        assert "not a course wire message" in _ask(server.path, b"\x80pickle")["error"]["message"]
        bad = _ask(server.path, {"token": t, "op": "forward", "init": [8, 5], "params": {"w1.weight": layer["w1.weight"]},
                                 "x": torch.zeros(2, 8)})
        assert bad["error"]["type"] == "RuntimeError" and "parameters changed" in bad["error"]["message"]
        huge = _ask(server.path, {"token": t, "op": "forward", "init": [8, 5], "params": layer, "x": torch.zeros(1 << 30, 0)})
        assert "too large" in huge["error"]["message"]
        assert "sizes between" in _ask(server.path, {"token": t, "op": "forward", "init": [10**9, 5], "params": layer,
                                                      "x": torch.zeros(2, 8)})["error"]["message"]
        ok = _ask(server.path, {"token": t, "op": "forward", "init": [8, 5], "params": layer, "x": torch.ones(2, 8)})
        assert torch.equal(ok["ok"], torch.zeros(2, 8))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # a message announced too large: connection closed
            s.connect(server.path)
            s.sendall((1 << 40).to_bytes(8, "little"))
            assert recv_message(s) is None
        deadline = time.monotonic() + 10
        while server.connections and time.monotonic() < deadline:  # the closed ones above are let go
            time.sleep(0.01)
        held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(MAX_CONNECTIONS + 1)]
        for s in held[:MAX_CONNECTIONS]:
            s.connect(server.path)
            send_message(s, wire.dumps({"token": "x"}))
            recv_message(s)  # served: the connection is open
        held[-1].connect(server.path)
        with contextlib.suppress(BrokenPipeError):
            send_message(held[-1], wire.dumps({"token": "x"}))
        assert recv_message(held[-1]) is None  # one connection too many is closed unanswered
        for s in held:
            s.close()
        stand = stand_ins(server.path, server.specs([t]))[0]
    with pytest.raises(OSError):  # after the exercise nothing answers, and nothing hangs
        stand(8, 5)(torch.ones(2, 8))


def test_a_stand_in_answers_only_while_its_own_test_runs():
    built, tokens, server = _served(kv_cache.DRAFTS)
    a, b = list(tokens)[:2]
    with server:
        fa, fb = stand_ins(server.path, server.specs([a, b]))
        server.active = a
        assert fa(1, 1, 1, 1) == built[tokens[a]](1, 1, 1, 1)
        with pytest.raises(RuntimeError, match="test is over"):
            fb(1, 1, 1, 1)


# A test that never states the formula: it records what every draft it is given computes, and passes a draft when
# an earlier one computed the same (correct drafts agree with each other; each mistake, written one way, is wrong
# in its own way). With one draft per mistake this sorts the drafts whenever a correct one comes first.
CONSENSUS = '''
def kv_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, batch=1, bytes_per_elem=2):
    ### BEGIN SOLUTION
    return 2 * n_layers * n_kv_heads * head_dim * seq_len * batch * bytes_per_elem
    ### END SOLUTION


_SEEN = []


def test_kv_cache_bytes(fn):
    ### BEGIN SOLUTION
    probe = [(3, 5, 7, 11, 13, 4), (2, 3, 5, 7)]
    mine = [fn(*a) for a in probe] + [type(fn(*probe[0]))]
    first = not _SEEN
    _SEEN.append(mine)
    assert first or _SEEN[:-1].count(mine) >= 1, "no other draft agrees"
    ### END SOLUTION
'''


def test_drafts_cannot_be_sorted_by_comparing_them_with_one_another():
    from course_judge import local

    v = local.grade("01_foundations", kv_cache, [local.Alternative("consensus of the drafts", source=CONSENSUS)])
    parts = {p.name: p.passed for p in v.parts}
    catching = [n for n in parts if n.startswith("test_kv_cache_bytes catches")]
    assert catching and not any(parts[n] for n in catching), v.report()


def test_correct_kv_drafts_have_no_more_company_than_wrong_ones():
    """The property behind the test above, on values: no correct draft has more company than a wrong one."""
    d = kv_cache.DRAFTS
    of, built = drafts.variants(d), drafts.build(d)
    probe = [(3, 5, 7, 11, 13, 4), (2, 3, 5, 7), (61, 128, 128, 4096)]
    values = {n: tuple((f(*a), type(f(*a))) for a in probe) for n, f in built.items()}
    company = {n: sum(v == values[n] for v in values.values()) for n in values}
    assert max(company[n] for n in d.correct) <= min(company[n] for n in values if of[n][0] in d.wrong), company
