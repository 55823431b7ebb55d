"""Exercise 1.2: truncated SVD factors (Eckart–Young), energy kept, effective rank."""

from __future__ import annotations

import torch

from course_judge.checks import assert_close, assert_true, expect_float, expect_int, expect_tensor, expect_tuple
from course_judge.local import Alternative, Mutant

GRADE_ID = "test_01_2_low_rank"
POINTS = 3
ANSWERS = ("ex_01_2_low_rank",)
SUMMARY = "factor shapes, the Eckart–Young error for ranks 0 .. min(m, n), optimality, B's orthonormal rows, energy, effective rank"
REFERENCE = ()


def _factors(f, W, r):
    A, B = expect_tuple(f(W, r), 2, f"low_rank_factors(W, {r})")
    return expect_tensor(A, "A"), expect_tensor(B, "B")


def judge(k, t):
    lrf, energy, eff = k.g.low_rank_factors, k.g.energy_kept, k.g.effective_rank
    with t.part("visible checks: shapes, the error bound, full energy, identity", 1):
        torch.manual_seed(0)
        W = torch.randn(12, 9, dtype=torch.float64)
        A, B = _factors(lrf, W, 4)
        expect_tensor(A, "A (decompress)", shape=(12, 4))
        expect_tensor(B, "B (compress)", shape=(4, 9))
        S = torch.linalg.svdvals(W)
        err = float(torch.linalg.norm(W - A @ B))
        assert_true(abs(err - float(S[4:].norm())) < 1e-9, f"rank-4 error {err:.6g} should equal sqrt(sum of dropped sigma^2) = "
                    f"{float(S[4:].norm()):.6g}", hint=_why_error(W, A, B, 4))
        assert_true(abs(expect_float(energy(S, 9), "energy_kept(S, 9)") - 1.0) < 1e-12, "all singular values keep all the energy")
        got = expect_int(eff(torch.eye(10, dtype=torch.float64), 0.9), "effective_rank(I, 0.9)")
        assert_true(got == 9, f"effective_rank(identity 10x10, 0.9) = {got}, expected 9",
                    hint="every direction of the identity holds 10% of the energy: 9 directions reach 90%")

    g = torch.Generator().manual_seed(5)
    cases = [(20, 7, 3), (5, 30, 5), (16, 16, 0), (8, 6, 6)]
    with t.part("Eckart–Young error and optimality, tall / wide / rank 0 / full rank", 0.5):
        for rows, n, r in cases:
            W = torch.randn(rows, n, generator=g, dtype=torch.float64)
            A, B = _factors(lrf, W, r)
            assert_true(tuple(A.shape) == (rows, r) and tuple(B.shape) == (r, n),
                        f"shapes for W {(rows, n)}, r={r}: got A {tuple(A.shape)}, B {tuple(B.shape)}")
            S = torch.linalg.svdvals(W)
            err = float(torch.linalg.norm(W - A @ B))
            assert_true(abs(err - float(S[r:].norm())) < 1e-9, f"rank-{r} error {err:.6g} != Eckart-Young bound {float(S[r:].norm()):.6g}",
                        hint=_why_error(W, A, B, r))
            if 0 < r < min(rows, n):
                P = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
                assert_true(err <= float(torch.linalg.norm(W - W @ P @ P.T)) + 1e-12, "a random projection beat your factors")
    with t.part("B has orthonormal rows (it is V_r^T; the singular values belong in A)", 0.5):
        for rows, n, r in cases:
            if not r:
                continue
            W = torch.randn(rows, n, generator=g, dtype=torch.float64)
            _, B = _factors(lrf, W, r)
            assert_close(B @ B.T, torch.eye(r, dtype=torch.float64), atol=1e-9, name="B B^T",
                         hint="B is V_r^T (orthonormal rows); multiply the singular values into A only")
    with t.part("energy_kept uses squared singular values", 0.5):
        for rows, n, r in cases:
            S = torch.linalg.svdvals(torch.randn(rows, n, generator=g, dtype=torch.float64))
            want = float((S[:r] ** 2).sum() / (S**2).sum())
            got = expect_float(energy(S, r), f"energy_kept(S, {r})")
            hint = ("use squared singular values (energy), not the singular values themselves"
                    if abs(got - float(S[:r].sum() / S.sum())) < 1e-12 and r else "sum of the top-r sigma^2 over the sum of all sigma^2")
            assert_true(abs(got - want) < 1e-12, f"energy_kept(S, {r}) = {got}, expected {want}", hint=hint)
    with t.part("effective rank on a matrix with a known spectrum", 0.5):
        U = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))[0]
        s = torch.tensor([10.0, 5.0, 2.0, 1.0] + [0.1] * 16, dtype=torch.float64)
        W = U[:, :20] @ torch.diag(s) @ V.T
        cum = torch.cumsum(s**2, 0) / (s**2).sum()
        for e in (0.5, 0.8, 0.95, 0.99, 1.0):
            want = int((cum < e - 1e-12).sum()) + 1
            got = expect_int(eff(W, e), f"effective_rank(W, {e})")
            hint = ("off by one: ranks start at 1 (the smallest r whose cumulative energy reaches the threshold)"
                    if abs(got - want) == 1 else "the smallest r with cumulative energy >= threshold, from squared singular values")
            assert_true(got == want, f"effective_rank at energy {e}: got {got}, expected {want}", hint=hint)


def _why_error(W, A, B, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    if r and A.shape == (W.shape[0], r) and B.shape == (r, W.shape[1]):
        if torch.allclose(A @ B, (U[:, -r:] * S[-r:]) @ Vh[-r:], atol=1e-9):
            return "you kept the SMALLEST r singular values: svd returns them in descending order, keep the first r"
        if torch.allclose(A @ B, (U[:, :r] * S[:r] ** 2) @ Vh[:r], atol=1e-9):
            return "the singular values are applied twice (in A and in B): put diag(S_r) in A only"
        if torch.allclose(A @ B, U[:, :r] @ Vh[:r], atol=1e-9):
            return "the singular values are missing: A = U_r diag(S_r)"
    return "A = U_r diag(S_r), B = V_r^T with the LARGEST r singular values"


MUTANTS = [
    Mutant("smallest singular values", "return U[:, :r] * S[:r], Vh[:r, :]",
           "return U[:, U.shape[1] - r:] * S[S.shape[0] - r:], Vh[Vh.shape[0] - r:, :]",
           expect="SMALLEST"),
    Mutant("sigma in both factors", "return U[:, :r] * S[:r], Vh[:r, :]", "return U[:, :r] * S[:r], S[:r, None] * Vh[:r, :]",
           expect="orthonormal rows"),
    Mutant("no sigma", "return U[:, :r] * S[:r], Vh[:r, :]", "return U[:, :r], Vh[:r, :]", expect="singular values are missing"),
    Mutant("energy from sigma, not sigma^2", "S2 = S.double() ** 2", "S2 = S.double()", expect="squared singular values"),
    Mutant("effective rank off by one", "- 1e-12)) + 1", "- 1e-12))", expect="off by one"),
    Mutant("sigma in B only", "return U[:, :r] * S[:r], Vh[:r, :]", "return U[:, :r], S[:r, None] * Vh[:r, :]",
           expect="orthonormal rows"),
    Mutant("effective rank from sigma", "cum = torch.cumsum(S**2, 0) / (S**2).sum()", "cum = torch.cumsum(S, 0) / S.sum()",
           expect="effective_rank at energy"),
]

ALTERNATIVES = [
    Alternative("eigendecomposition and a loop", source='''
def low_rank_factors(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    A = U[:, :r] @ torch.diag(S[:r])
    B = Vh[:r]
    return A, B


def energy_kept(S, r):
    total = float((S.double() ** 2).sum())
    return float((S.double()[:r] ** 2).sum()) / total


def effective_rank(W, energy=0.9):
    S2 = torch.linalg.svdvals(W.double()) ** 2
    total, acc = float(S2.sum()), 0.0
    for r, s2 in enumerate(S2.tolist(), 1):
        acc += s2
        if acc >= energy * total - 1e-12 * total:
            return r
    return len(S2)
'''),
]
