"""torch.ops.sparsecode_C.latent_rows_sum and latent_rows_sum_dots (CPU) against dense sums."""

from __future__ import annotations

import pytest
import torch

import sparsecode  # noqa: F401  (registers torch.ops.sparsecode_C)
from sparsecode import reference
from tests.conftest import TOLERANCE, assert_close


def dense_reference(coef: torch.Tensor, indices: torch.Tensor, src: torch.Tensor, d_sae: int):
    """out[i] = sum over (b, j) with indices[b, j] == i of coef[b, j] * src[b], in float64."""
    return reference.dense_code(coef.double(), indices, d_sae).T @ src.double()


def random_indices(B: int, n: int, k: int) -> torch.Tensor:
    """Distinct indices [B, k] per row, in random order."""
    return torch.rand(B, n).argsort(dim=1)[:, :k]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "B,d,n,k", [(1, 1, 1, 1), (1, 7, 33, 1), (5, 100, 33, 3), (33, 7, 1000, 32), (17, 65, 40, 40)]
)
def test_matches_dense_reference(B, d, n, k, dtype, seed, poisoned):
    coef = torch.randn(B, k)
    indices = random_indices(B, n, k)
    src = torch.randn(B, d, dtype=dtype)
    out = torch.ops.sparsecode_C.latent_rows_sum(coef, indices, src, n)
    assert out.dtype == dtype
    assert_close(out, dense_reference(coef, indices, src, n), TOLERANCE[dtype])


def test_repeated_latents_and_unused_rows(seed, poisoned):
    """A latent used by every row sums all of them; latents no pair uses get zero rows."""
    B, d, n, k = 50, 9, 20, 3
    indices = torch.randint(0, 5, (B, k))
    indices[:, 0] = 0
    coef = torch.randn(B, k, dtype=torch.float64)
    src = torch.randn(B, d, dtype=torch.float64)
    out = torch.ops.sparsecode_C.latent_rows_sum(coef, indices, src, n)
    assert_close(out, dense_reference(coef, indices, src, n), 1e-12)
    assert torch.equal(out[5:], torch.zeros(n - 5, d, dtype=torch.float64))


def test_coef_dtype_follows_src(seed, poisoned):
    """coef in another floating dtype is used in src's accumulation type; out has src's dtype."""
    coef = torch.randn(6, 4, dtype=torch.float64)
    indices = random_indices(6, 30, 4)
    src = torch.randn(6, 11)
    out = torch.ops.sparsecode_C.latent_rows_sum(coef, indices, src, 30)
    assert out.dtype == torch.float32
    assert_close(out, dense_reference(coef.float(), indices, src, 30), TOLERANCE[torch.float32])


def test_deterministic(seed):
    indices = torch.randint(0, 16, (200, 8))
    coef, src = torch.randn(200, 8), torch.randn(200, 33)
    first = torch.ops.sparsecode_C.latent_rows_sum(coef, indices, src, 16)
    assert torch.equal(first, torch.ops.sparsecode_C.latent_rows_sum(coef, indices, src, 16))


def grouped_reference(coef: torch.Tensor, indices: torch.Tensor, src: torch.Tensor,
                      src_rows: torch.Tensor, d_sae: int) -> torch.Tensor:
    """out[i] = sum over (b, j) with indices[b, j] == i of coef[b, j] * src[src_rows[b, j]]."""
    terms = coef.reshape(-1, 1).double() * src.double()[src_rows.reshape(-1)]
    return torch.zeros(d_sae, src.shape[1], dtype=torch.float64, device=src.device).index_add_(
        0, indices.reshape(-1), terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,d,n,k,G", [(1, 1, 1, 1, 1), (5, 100, 33, 3, 4), (33, 7, 1000, 32, 6)])
def test_src_rows(B, d, n, k, G, dtype, seed, poisoned):
    """Pairs read the src rows that src_rows names, as the nested loss's [G * B, d] suffix sums
    of the residuals are read."""
    coef = torch.randn(B, k)
    indices = random_indices(B, n, k)
    src = torch.randn(G * B, d, dtype=dtype)
    src_rows = torch.randint(0, G * B, (B, k))
    out = torch.ops.sparsecode_C.latent_rows_sum(coef, indices, src, n, src_rows)
    assert out.dtype == dtype
    assert_close(out, grouped_reference(coef, indices, src, src_rows, n), TOLERANCE[dtype])


def test_bad_arguments_are_named():
    coef, indices, src = torch.randn(2, 3), random_indices(2, 10, 3), torch.randn(2, 4)
    bad = indices.clone()
    bad[1, 2] = 10
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, d_sae=10\)"):
        torch.ops.sparsecode_C.latent_rows_sum(coef, bad, src, 10)
    with pytest.raises(RuntimeError, match="indices and coef must have the same shape"):
        torch.ops.sparsecode_C.latent_rows_sum(coef, indices[:, :2], src, 10)
    with pytest.raises(RuntimeError, match="src must be"):
        torch.ops.sparsecode_C.latent_rows_sum(coef, indices, src[:1], 10)
    rows = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"src_rows must lie in \[0, src's rows=2\)"):
        torch.ops.sparsecode_C.latent_rows_sum(coef, indices, src, 10, rows + 2)
    with pytest.raises(RuntimeError, match="src_rows must be an int64 \\[B, k\\] tensor"):
        torch.ops.sparsecode_C.latent_rows_sum(coef, indices, src, 10, rows[:, :2])



@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,d,n,k,G", [(1, 1, 1, 1, 1), (5, 100, 33, 3, 4), (33, 7, 1000, 32, 2),
                                       (0, 5, 9, 3, 1)])
@pytest.mark.parametrize("with_rows", [False, True])
def test_dots(B, d, n, k, G, dtype, with_rows, seed, poisoned):
    """latent_rows_sum_dots: the same sums as latent_rows_sum, and every pair's src row dotted
    with its latent's weights row, zero coefficients included."""
    coef = torch.randn(B, k)
    coef[coef < -0.5] = 0.0
    indices = torch.randint(0, n, (B, k))
    src = torch.randn(G * B if with_rows else B, d, dtype=dtype)
    weights = torch.randn(n, d, dtype=dtype)
    src_rows = torch.randint(0, max(G * B, 1), (B, k)) if with_rows else None
    out, dots = torch.ops.sparsecode_C.latent_rows_sum_dots(coef, indices, src, weights, src_rows)
    assert torch.equal(out, torch.ops.sparsecode_C.latent_rows_sum(coef, indices, src, n, src_rows))
    assert dots.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert dots.shape == (B, k)
    read = src_rows if with_rows else torch.arange(B)[:, None].expand(B, k)
    ref = (src.double()[read] * weights.double()[indices]).sum(-1)
    assert_close(dots, ref, TOLERANCE[dtype])


def test_dots_bad_arguments_are_named():
    coef, indices, src = torch.randn(2, 3), random_indices(2, 10, 3), torch.randn(2, 4)
    weights = torch.randn(10, 4)
    with pytest.raises(RuntimeError, match=r"weights must be \[d_sae, d\] with src's d = 4"):
        torch.ops.sparsecode_C.latent_rows_sum_dots(coef, indices, src, weights[:, :3])
    with pytest.raises(RuntimeError, match="src and weights must have the same dtype"):
        torch.ops.sparsecode_C.latent_rows_sum_dots(coef, indices, src, weights.double())
    bad = indices.clone()
    bad[0, 0] = 9
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, d_sae=9\)"):
        torch.ops.sparsecode_C.latent_rows_sum_dots(coef, bad, src, weights[:9])
    with pytest.raises(RuntimeError, match="weights must have 2 dimensions"):
        torch.ops.sparsecode_C.latent_rows_sum_dots(coef, indices, src, weights[0])
