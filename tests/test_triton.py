"""The triton backend's kernels against the reference, run interpreted on the CPU
(TRITON_INTERPRET=1, set by conftest when there is no GPU), on tiny awkward shapes.

The interpreter cannot run bfloat16 tl.dot, so bfloat16 is checked on the GPU only
(tests/test_triton_gpu.py). Gradients that the backend takes from the compiled extension are
checked on both of their paths: the extension's CPU kernels and the plain-torch fallback.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

triton = pytest.importorskip("triton",
                             reason="the triton package is not installed (pip install triton)")

from sparsecode import nested_prefix_loss as nested_module  # noqa: E402
from sparsecode import ops, reference, sparse_grad  # noqa: E402
from sparsecode.nested_prefix_loss import nested_prefix_loss_and_decode  # noqa: E402
from sparsecode.backends import BackendUnavailableError, resolve_backend  # noqa: E402
from sparsecode.triton_kernels.topk_encode import EncodeConfig, topk_encode_forward  # noqa: E402
from tests.conftest import (TOLERANCE, assert_close, exact_tie_inputs,  # noqa: E402
                            lowest_ids_first)
from tests import test_nested_prefix_loss as nested_tests  # noqa: E402
from tests.test_topk_encode import check_topk_selection, make_inputs, reference_at  # noqa: E402

if torch.cuda.is_available():
    pytest.skip("the interpreted checks run on CPU-only machines", allow_module_level=True)

SHAPES = [
    (B, d, n, k)
    for B, d, n, k in itertools.product([1, 5], [7, 32], [33, 130], [1, 3, 8])
]
DTYPES = [torch.float32, torch.float16]
GRAD_PATHS = ["extension", "torch"]
# How the encode folds its tiles into the running top k (EncodeConfig fields): whole tiles or
# by column halves.
FOLDS = {"whole": {}, "halves": {"select_halves": True}}


def without_extension_kernels(monkeypatch) -> None:
    """As where sparsecode._C has no kernels for the device: the sparse gradients, the nested
    loss's grad_W_dec and grad_values among them, from plain torch ops."""
    monkeypatch.setattr(sparse_grad, "compiled_kernels", lambda device: None)
    monkeypatch.setattr(nested_module, "compiled_kernels", lambda device: None)


@pytest.fixture(params=GRAD_PATHS)
def grad_path(request, monkeypatch) -> str:
    """Runs the test with the sparse gradients from the extension, then from plain torch ops."""
    if request.param == "torch":
        without_extension_kernels(monkeypatch)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,n,k", SHAPES)
def test_encode_matches_reference(B, d, n, k, dtype, grad_path, seed, poisoned):
    inputs = [t.requires_grad_() for t in make_inputs(B, d, n, dtype)]
    values, indices = ops.topk_encode(*inputs, k, backend="triton")
    assert values.dtype == dtype
    check_topk_selection(inputs, indices, k, slack=1e-5 if dtype == torch.float32 else 1e-2)

    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref_values = reference_at(inputs64, indices)
    assert_close(values, ref_values, TOLERANCE[dtype], "values")

    grad = torch.randn(values.shape, dtype=dtype)
    grads = torch.autograd.grad(values, inputs, grad)
    ref_grads = torch.autograd.grad(ref_values, inputs64, grad.double())
    for name, g, ref in zip(["x", "W_enc", "b_enc", "b_dec"], grads, ref_grads):
        assert_close(g, ref, TOLERANCE[dtype], f"grad {name}")


@pytest.mark.parametrize("B,d,n,k", [(1, 7, 33, 1), (5, 32, 130, 8)])
def test_encode_without_grad_x(B, d, n, k, grad_path, seed):
    """When x needs no gradient (a training step) the backward skips grad_x; the weight and
    bias gradients still match the reference."""
    inputs = make_inputs(B, d, n, torch.float32)
    leaves = [t.requires_grad_() for t in inputs[1:]]
    values, indices = ops.topk_encode(*inputs, k, backend="triton")
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref_values = reference_at(inputs64, indices)
    grad = torch.randn(values.shape)
    grads = torch.autograd.grad(values, leaves, grad)
    ref_grads = torch.autograd.grad(ref_values, inputs64[1:], grad.double())
    for name, g, ref in zip(["W_enc", "b_enc", "b_dec"], grads, ref_grads):
        assert_close(g, ref, TOLERANCE[torch.float32], f"grad {name}")


@pytest.mark.parametrize("fold", FOLDS)
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_encode_result_does_not_depend_on_the_column_split(splits, fold, seed):
    x, W_enc, b_enc, b_dec = make_inputs(5, 130, 130, torch.float32)
    config = EncodeConfig(block_b=16, block_n=16, block_d=16, splits=splits, num_warps=1,
                          **FOLDS[fold])
    values, indices = topk_encode_forward(x, W_enc, b_enc, b_dec, 8, config)
    ref_values, ref_indices = reference.topk_encode(*(t.double() for t in (x, W_enc, b_enc, b_dec)), 8)
    assert torch.equal(indices, ref_indices)
    assert_close(values, ref_values, TOLERANCE[torch.float32], "values")


@pytest.mark.parametrize("fold", FOLDS)
@pytest.mark.parametrize("splits", [3, 8])
def test_encode_16_bit_result_does_not_depend_on_the_split_or_fold(splits, fold, seed):
    """16-bit inputs rank by keys (the values' top 24 bits, then the column): the same values
    and indices bit for bit whatever the split and fold, and a top k of the pre-activations."""
    inputs = make_inputs(5, 130, 130, torch.float16)
    tiles = dict(block_b=16, block_n=16, block_d=16, num_warps=1)
    values, indices = topk_encode_forward(*inputs, 8, EncodeConfig(**tiles, splits=splits,
                                                                   **FOLDS[fold]))
    one_range = topk_encode_forward(*inputs, 8, EncodeConfig(**tiles, splits=1))
    assert torch.equal(indices, one_range[1])
    assert torch.equal(values, one_range[0])
    check_topk_selection(inputs, indices, 8, slack=1e-2)
    assert_close(values, reference_at([t.double() for t in inputs], indices),
                 TOLERANCE[torch.float16], "values")


@pytest.mark.parametrize("splits", [1, 8])
def test_encode_merge_of_wide_candidate_lists_matches(splits, monkeypatch, seed):
    """Candidate lists wider than MERGE_WIDTH merge with torch ops instead of _merge_kernel
    (one range only sorts by id): the same values and indices, exact ties among the candidates
    included."""
    from sparsecode.triton_kernels import topk_encode as module

    x = torch.randint(-3, 4, (5, 16)).float()
    W_enc = torch.randint(-2, 3, (16, 130)).float()
    b_enc, b_dec = torch.zeros(130), torch.zeros(16)
    config = EncodeConfig(block_b=16, block_n=16, block_d=16, splits=splits, num_warps=1)
    in_kernel = topk_encode_forward(x, W_enc, b_enc, b_dec, 8, config)
    monkeypatch.setattr(module, "MERGE_WIDTH", 4)  # splits x 8 candidates > 4
    with_torch = topk_encode_forward(x, W_enc, b_enc, b_dec, 8, config)
    assert torch.equal(in_kernel[1], with_torch[1])
    assert torch.equal(in_kernel[0], with_torch[0])


def random_and_tied_inputs(dtype: torch.dtype) -> list[list[torch.Tensor]]:
    """Encoder inputs (x, W_enc, b_enc, b_dec) in dtype twice: random rows, and small integers
    whose pre-activations are exact and full of ties."""
    return [make_inputs(5, 32, 130, dtype), [t.to(dtype) for t in exact_tie_inputs(5, 16, 130)]]


# EncodeConfig(tma=True) under the interpreter: triton's interpreter runs tensor descriptors as
# masked loads (zero past the edges), and checks their 16-byte alignment as the GPU needs.
_TMA_TILES = dict(block_b=16, block_n=32, block_d=16, splits=2, num_warps=1, num_stages=1)
_INTERPRETER_HAS_DESCRIPTORS = hasattr(triton.language, "make_tensor_descriptor")
needs_interpreted_descriptors = pytest.mark.skipif(
    not _INTERPRETER_HAS_DESCRIPTORS,
    reason=f"triton {triton.__version__}'s interpreter has no tl.make_tensor_descriptor",
)


@needs_interpreted_descriptors
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,n,k", itertools.product([5], [32, 40], [64, 136], [1, 3]))
def test_encode_with_tensor_descriptors_matches_reference(B, d, n, k, dtype, seed):
    """The TMA load path, with the tile folded in by column halves (the Hopper default): row,
    column and d tails past the tensors' edges (B < block_b, n and d not multiples of the
    tiles) are zero-filled like the masked loads, so the result is the masked whole-tile
    path's, bit for bit, and matches the reference."""
    inputs = make_inputs(B, d, n, dtype)
    values, indices = topk_encode_forward(
        *inputs, k, EncodeConfig(**_TMA_TILES, tma=True, select_halves=True))
    assert values.dtype == dtype
    check_topk_selection(inputs, indices, k, slack=1e-5 if dtype == torch.float32 else 1e-2)
    ref_values = reference_at([t.double() for t in inputs], indices)
    assert_close(values, ref_values, TOLERANCE[dtype], "values")
    masked_values, masked_indices = topk_encode_forward(*inputs, k, EncodeConfig(**_TMA_TILES))
    assert torch.equal(indices, masked_indices)
    assert torch.equal(values, masked_values)


def test_encode_with_tensor_descriptors_rejects_misaligned_inputs(seed):
    config = EncodeConfig(**_TMA_TILES, tma=True)
    for dtype, d, n, name in ((torch.float32, 30, 64, "d_model=30"),
                              (torch.float32, 32, 66, "d_sae=66"),
                              (torch.float16, 36, 64, "d_model=36"),
                              (torch.float16, 32, 68, "d_sae=68")):
        with pytest.raises(ValueError, match=f"tma=True.*{name}"):
            topk_encode_forward(*make_inputs(5, d, n, dtype), 1, config)
    # 16-byte rows, but W_enc starts 4 bytes into its storage.
    x, W_enc, b_enc, b_dec = make_inputs(5, 32, 64, torch.float32)
    shifted = torch.empty(32 * 64 + 1)[1:].view(32, 64).copy_(W_enc)
    with pytest.raises(ValueError, match=r"tma=True\) needs 16-byte aligned data; W_enc"):
        topk_encode_forward(x, shifted, b_enc, b_dec, 1, config)
    masked = EncodeConfig(**_TMA_TILES)  # the pointer loads take any alignment
    assert torch.equal(topk_encode_forward(x, shifted, b_enc, b_dec, 1, masked)[1],
                       topk_encode_forward(x, W_enc, b_enc, b_dec, 1, masked)[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fold", FOLDS)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_encode_exact_ties_keep_the_lowest_ids(k, fold, dtype, seed):
    """Small-integer inputs make every pre-activation an exact integer, so rows are full of
    exact ties; the kernel keeps the lower latent id among equals, whatever the split, whether a
    tile is folded in whole or by column halves, and whether it ranks values (float32) or keys
    (16-bit inputs), and the values are exact."""
    x, W_enc, b_enc, b_dec = exact_tie_inputs(5, 16, 130)
    config = EncodeConfig(block_b=16, block_n=32, block_d=16, splits=2, num_warps=1,
                          **FOLDS[fold])
    values, indices = topk_encode_forward(*(t.to(dtype) for t in (x, W_enc, b_enc, b_dec)), k,
                                          config)
    pre = (x - b_dec) @ W_enc + b_enc
    assert torch.equal(indices, lowest_ids_first(pre, k))
    assert torch.equal(values.float(), torch.relu(pre.gather(1, indices))), "values not exact"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fold", FOLDS)
@pytest.mark.parametrize("unchecked", [1, 3, 256])
def test_encode_unchecked_steps_change_nothing(unchecked, fold, dtype, seed):
    """Insertion steps taken before the fold tests whether any row is left
    (EncodeConfig.unchecked_steps; 256, more than a tile's columns: the count of entries above
    the threshold alone) give the same values and indices bit for bit, on random rows and on
    rows full of exact ties."""
    tiles = dict(block_b=16, block_n=32, block_d=16, splits=2, num_warps=1, **FOLDS[fold])
    for inputs in random_and_tied_inputs(dtype):
        expected = topk_encode_forward(*inputs, 8, EncodeConfig(**tiles))
        got = topk_encode_forward(*inputs, 8, EncodeConfig(**tiles, unchecked_steps=unchecked))
        assert torch.equal(got[1], expected[1])
        assert torch.equal(got[0], expected[0])


def test_encode_all_negative_preactivations_give_zero_values(seed):
    x, W_enc, b_enc, b_dec = make_inputs(5, 7, 33, torch.float32)
    values, indices = ops.topk_encode(x, W_enc, b_enc - 100.0, b_dec, 3, backend="triton")
    assert torch.equal(values, torch.zeros_like(values))
    check_topk_selection([x, W_enc, b_enc - 100.0, b_dec], indices, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,n,k", SHAPES)
def test_decode_matches_reference(B, d, n, k, dtype, grad_path, seed, poisoned):
    values = torch.rand(B, k, dtype=dtype) + 0.1
    values[0, 0] = 0.0  # a zero value is skipped by the gather and must still decode right
    indices = torch.stack([torch.randperm(n)[:k].sort().values for _ in range(B)])
    W_dec = torch.randn(n, d, dtype=dtype)
    b_dec = torch.randn(d, dtype=dtype)
    leaves = [t.requires_grad_() for t in (values, W_dec, b_dec)]
    out = ops.sparse_decode(leaves[0], indices, leaves[1], leaves[2], backend="triton")
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.sparse_decode(leaves64[0], indices, leaves64[1], leaves64[2])
    assert_close(out, ref, TOLERANCE[dtype], "x_hat")

    grad = torch.randn(out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_grads = torch.autograd.grad(ref, leaves64, grad.double())
    for name, g, r in zip(["values", "W_dec", "b_dec"], grads, ref_grads):
        assert_close(g, r, TOLERANCE[dtype], f"grad {name}")


def test_walks_through_the_autotuner_match_the_direct_launch(monkeypatch, seed):
    """Walks as large ones launch them, through the autotuner (one depth when interpreted), give
    the bits of the direct launch at depth 1: the decode, grad_values and the nested loss's
    forward (and the backward from its residuals)."""
    from sparsecode.triton_kernels import nested_prefix_loss as nested
    from sparsecode.triton_kernels import sparse_decode as decode

    x, values, indices, W_dec, b_dec, sizes, weights = nested_tests.make_problem(
        5, 32, 130, 8, torch.float32)
    grad_loss, grad_prefix_losses = torch.tensor(1.5), torch.rand(len(sizes))

    def outputs(stages: int | None) -> list[torch.Tensor]:
        forward = nested.nested_prefix_loss_forward(x, values, indices, W_dec, b_dec, sizes,
                                                    weights, stages=stages)
        suffix = nested.nested_prefix_loss_suffix_sums(
            grad_loss, grad_prefix_losses, x, values, indices, W_dec, sizes, weights, forward[3])
        backward = [*suffix, *nested.nested_prefix_loss_pair_grads(suffix[0], values, indices,
                                                                   W_dec, sizes)]
        return [decode.sparse_decode_forward(values, indices, W_dec, b_dec, stages=stages),
                decode.sparse_decode_grad_values(x, indices, W_dec, stages=stages),
                *forward, *backward]

    expected = outputs(1)
    monkeypatch.setattr(decode, "AUTOTUNE_MIN_ELEMENTS", 0)
    decode.autotuned.cache_clear()
    for got, want in zip(outputs(None), expected, strict=True):
        assert torch.equal(got, want)
    assert decode.autotuned.cache_info().currsize == 3, "the three walks went through autotuned"


@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])  # no tl.dot: bf16 runs interpreted
@pytest.mark.parametrize("B,d,n,k", SHAPES)
def test_nested_loss_matches_reference(B, d, n, k, dtype, grad_path, seed, poisoned):
    """The Triton forward walk (loss, prefix losses, x_hat) and the op's gradients, through all
    three outputs (the residuals walked again) and through the loss alone (the forward's suffix
    sums), on rows whose slots are not in index order, with a zero value, a one-latent group
    and a prefix smaller than k."""
    x, values, indices, W_dec, b_dec, sizes, weights = nested_tests.make_problem(B, d, n, k, dtype)
    values[0, 0] = 0.0
    shuffle = torch.rand(B, k).argsort(dim=1)
    values, indices = values.gather(1, shuffle), indices.gather(1, shuffle)
    leaves = [t.requires_grad_() for t in (x, values, W_dec, b_dec)]
    for loss_only in (False, True):
        outputs = nested_prefix_loss_and_decode(leaves[0], leaves[1], indices, leaves[2],
                                                leaves[3], sizes, weights, backend="triton")
        nested_tests.check_against_reference(outputs, leaves, indices, sizes, weights,
                                             TOLERANCE[dtype], loss_only=loss_only)


@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
def test_nested_loss_backward_of_constant_x_matches_reference(dtype, seed):
    """A training step's backward: from the loss alone, with x (the activations) not requiring
    grad, so no grad_x is made; the gradients of values, W_dec and b_dec are the bits of the
    backward that also makes grad_x, and match the float64 reference."""
    x, values, indices, W_dec, b_dec, sizes, weights = nested_tests.make_problem(9, 33, 70, 5,
                                                                                 dtype)
    grads = {}
    for x_needs_grad in (False, True):
        x_leaf = x.clone().requires_grad_(x_needs_grad)
        leaves = [t.clone().requires_grad_() for t in (values, W_dec, b_dec)]
        loss, _, _ = nested_prefix_loss_and_decode(x_leaf, leaves[0], indices, leaves[1],
                                                   leaves[2], sizes, weights, backend="triton")
        grads[x_needs_grad] = torch.autograd.grad(loss, leaves)
    for without, with_x in zip(grads[False], grads[True], strict=True):
        assert torch.equal(without, with_x)
    leaves64 = [t.double().requires_grad_() for t in (values, W_dec, b_dec)]
    ref_loss, _ = reference.nested_prefix_loss(x.double(), leaves64[0], indices, leaves64[1],
                                               leaves64[2], sizes, weights)
    ref_grads = torch.autograd.grad(ref_loss, leaves64)
    for name, got, want in zip(("values", "W_dec", "b_dec"), grads[False], ref_grads):
        assert_close(got, want, TOLERANCE[dtype], f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_nested_loss_of_16_prefixes_matches_reference(dtype, seed):
    """G = 16, the most: the walk packs each slot's group in 4 bits (up to 15), and the rows'
    slots span every group, the last ones included."""
    B, d, n, k = 5, 33, 64, 24
    x, values, indices, W_dec, b_dec, _, _ = nested_tests.make_problem(B, d, n, k, dtype)
    sizes = list(range(4, n + 1, 4))
    weights = (torch.rand(len(sizes)) + 0.1).tolist()
    last = torch.tensor(sizes) - 1  # each group's last latent, n - 1 the last of all
    rest = torch.tensor([i for i in range(n) if i + 1 not in sizes])
    picked = [torch.cat([last, rest[torch.randperm(len(rest))[: k - len(sizes)]]])
              for _ in range(B)]
    indices = torch.stack([row[torch.randperm(k)] for row in picked])
    leaves = [t.requires_grad_() for t in (x, values, W_dec, b_dec)]
    outputs = nested_prefix_loss_and_decode(leaves[0], leaves[1], indices, leaves[2], leaves[3],
                                            sizes, weights, backend="triton")
    nested_tests.check_against_reference(outputs, leaves, indices, sizes, weights,
                                         TOLERANCE[dtype])


def test_walks_give_the_same_bits_with_64_bit_offsets(monkeypatch, seed):
    """The walks' 64-bit offsets of W_dec, the code and R (taken from WIDE_ELEMENTS on) give the
    bits of their 32-bit ones: the decode, its grad_values and the nested loss's forward walk
    (its suffix sums, and the residuals walked again)."""
    from sparsecode.triton_kernels import nested_prefix_loss as nested
    from sparsecode.triton_kernels import sparse_decode as decode

    problem = nested_tests.make_problem(5, 32, 130, 8, torch.float32)
    x, values, indices, W_dec, b_dec, sizes, _ = problem

    def outputs() -> list[torch.Tensor]:
        return [decode.sparse_decode_forward(values, indices, W_dec, b_dec),
                decode.sparse_decode_grad_values(x, indices, W_dec),
                *nested.nested_prefix_loss_forward(*problem),
                nested.nested_prefix_loss_residuals(x, values, indices, W_dec, b_dec, sizes)]

    narrow = outputs()
    monkeypatch.setattr(decode, "WIDE_ELEMENTS", 0)
    monkeypatch.setattr(nested, "WIDE_ELEMENTS", 0)
    for position, (got, want) in enumerate(zip(outputs(), narrow, strict=True)):
        assert torch.equal(got, want), f"output {position}"


def test_nested_suffix_sums_give_the_same_bits_over_any_tiles(monkeypatch, seed):
    """The suffix sums are elementwise: tiles of 2 rows x 16 columns (several of each, the last
    ones partial) give the bits of the default tiles (one masked tile at this size)."""
    from sparsecode.triton_kernels import nested_prefix_loss as nested

    x, values, indices, W_dec, b_dec, sizes, weights = nested_tests.make_problem(
        5, 33, 40, 4, torch.float32)
    resid = nested.nested_prefix_loss_residuals(x, values, indices, W_dec, b_dec, sizes)
    upstream = (torch.tensor(0.7), torch.rand(len(sizes)), torch.randn_like(x))
    arguments = (*upstream, values, indices, W_dec, sizes, weights, resid)
    default = nested.nested_prefix_loss_suffix_sums(*arguments)
    monkeypatch.setattr(nested, "_SUFFIX_ROWS", 2)
    monkeypatch.setattr(nested, "_SUFFIX_COLS", 16)
    for got, want in zip(nested.nested_prefix_loss_suffix_sums(*arguments), default, strict=True):
        assert torch.equal(got, want)


def test_nested_loss_backward_from_the_loss_alone_takes_the_forward_suffix_sums(monkeypatch,
                                                                                 seed):
    """A backward from the loss alone takes the suffix sums the forward saved, without walking
    the residuals again, and gives the bits of the backward that walks them (upstream zeros on
    the prefix losses take that one); the graph keeps what it saved, so a second backward
    through it gives the same bits."""
    from sparsecode.triton_kernels import nested_prefix_loss as nested

    x, values, indices, W_dec, b_dec, sizes, weights = nested_tests.make_problem(
        5, 32, 130, 8, torch.float32)
    leaves = [t.requires_grad_() for t in (x, values, W_dec, b_dec)]
    walks = []
    residuals = nested.nested_prefix_loss_residuals

    def spy(*args):
        walks.append("residuals")
        return residuals(*args)

    monkeypatch.setattr(nested, "nested_prefix_loss_residuals", spy)
    loss, prefix_losses, _ = nested_prefix_loss_and_decode(*leaves[:2], indices, *leaves[2:],
                                                           sizes, weights, backend="triton")
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    assert walks == []
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(loss, leaves), first))
    loss, prefix_losses, _ = nested_prefix_loss_and_decode(*leaves[:2], indices, *leaves[2:],
                                                           sizes, weights, backend="triton")
    walked = torch.autograd.grad([loss, prefix_losses], leaves,
                                 [torch.tensor(1.0), torch.zeros(len(sizes))])
    assert walks == ["residuals"]
    for name, a, b in zip(["x", "values", "W_dec", "b_dec"], first, walked, strict=True):
        assert torch.equal(a, b), f"grad {name}"


def test_nested_loss_makes_no_suffix_sums_where_no_backward_follows(monkeypatch, seed):
    """Under no_grad, or with no input requiring grad, the triton forward skips the suffix sums
    (the op's fourth output is then [G, 0, d]) and gives the bits of the forward that makes
    them; with an input requiring grad it makes them."""
    from sparsecode.triton_kernels import nested_prefix_loss as nested

    x, values, indices, W_dec, b_dec, sizes, weights = nested_tests.make_problem(
        5, 32, 130, 8, torch.float32)
    inputs = (x, values, indices, W_dec, b_dec, sizes, weights)
    with_sums = torch.ops.sparsecode.nested_prefix_loss(*inputs, "triton", True)
    without = torch.ops.sparsecode.nested_prefix_loss(*inputs, "triton", False)
    assert with_sums[3].shape == (len(sizes), 5, 32) and without[3].shape == (len(sizes), 0, 32)
    for got, want in zip(without[:3], with_sums[:3], strict=True):
        assert torch.equal(got, want)

    made = []
    walk = nested._walk

    def spy(*args):
        made.append(args[6] is not None)
        return walk(*args)

    monkeypatch.setattr(nested, "_walk", spy)
    leaf = W_dec.clone().requires_grad_()
    for context, decoder in ((contextlib.nullcontext(), leaf), (torch.no_grad(), leaf),
                             (contextlib.nullcontext(), W_dec)):
        with context:
            nested_prefix_loss_and_decode(x, values, indices, decoder, b_dec, sizes, weights,
                                          backend="triton")
    assert made == [True, False, False]


def test_nested_loss_backward_never_holds_the_residuals_and_grad_W_dec(monkeypatch, seed):
    """Under other upstream gradients than the loss's alone, the residuals R [G, B, d]
    (float32) that the backward walks again are freed before the pass over the pairs allocates
    grad_W_dec, and outputs without a gradient get none rather than zeros (x_hat's, unused here,
    reaches the backward as None)."""
    from sparsecode.triton_kernels import nested_prefix_loss as nested

    x, values, indices, W_dec, b_dec, sizes, weights = nested_tests.make_problem(
        5, 32, 130, 8, torch.float32)
    W_dec.requires_grad_()
    seen = {}
    suffix_sums, pair_sums = nested.nested_prefix_loss_suffix_sums, nested.latent_rows_sum_dots

    def spy_suffix(*args):
        seen["grad_x_hat"], seen["R"] = args[2], args[-1]
        return suffix_sums(*args)

    def spy_pairs(*args):
        seen["R bytes"] = seen.pop("R").untyped_storage().nbytes()
        return pair_sums(*args)

    monkeypatch.setattr(nested, "nested_prefix_loss_suffix_sums", spy_suffix)
    monkeypatch.setattr(nested, "latent_rows_sum_dots", spy_pairs)
    loss, prefix_losses, _ = nested_prefix_loss_and_decode(x, values, indices, W_dec, b_dec,
                                                           sizes, weights, backend="triton")
    (loss + prefix_losses[0]).backward()
    assert seen == {"grad_x_hat": None, "R bytes": 0}


def test_nested_loss_constants_are_made_once():
    """The prefix sizes and weights go to the device once per (numbers, dtype, device) and are
    kept: the same tensor again for the same numbers, a new one for others."""
    from sparsecode.triton_kernels.nested_prefix_loss import _on_device

    cpu = torch.device("cpu")
    sizes = _on_device([8, 16, 40], torch.int64, cpu)
    assert sizes.dtype == torch.int64 and sizes.tolist() == [8, 16, 40]
    assert _on_device((8, 16, 40), torch.int64, cpu) is sizes
    assert _on_device([8, 16, 41], torch.int64, cpu).tolist() == [8, 16, 41]
    weights = _on_device([8, 16, 40], torch.float64, cpu)
    assert weights is not sizes and weights.dtype == torch.float64


def test_nested_loss_triton_ops_pass_opcheck(seed):
    """torch.library.opcheck of the triton forward (with and without the suffix sums) and of
    the backward's ops (the pass over the
    pairs from the forward's suffix sums; the residuals walked again, the suffix sums with and
    without grad_x_hat and the pass over the pairs from them): schemas, fake tensors and tracing
    agree with what the ops do."""
    x, values, indices, W_dec, b_dec, sizes, weights = nested_tests.make_problem(
        6, 5, 14, 3, torch.float32)
    for suffix_sums in (True, False):
        torch.library.opcheck(torch.ops.sparsecode.nested_prefix_loss.default,
                              (x, values, indices, W_dec, b_dec, sizes, weights, "triton",
                               suffix_sums))
    P = torch.ops.sparsecode.nested_prefix_loss.default(
        x, values, indices, W_dec, b_dec, sizes, weights, "triton", True)[3]
    torch.library.opcheck(torch.ops.sparsecode.nested_prefix_loss_pair_grads_triton.default,
                          (P, values, indices, W_dec, sizes))
    residuals = (x, values, indices, W_dec, b_dec, sizes)
    torch.library.opcheck(torch.ops.sparsecode.nested_prefix_loss_residuals_triton.default,
                          residuals)
    resid = torch.ops.sparsecode.nested_prefix_loss_residuals_triton.default(*residuals)
    for grad_x_hat in (None, torch.randn_like(x)):
        suffix = (torch.tensor(1.5), torch.rand(len(sizes)), grad_x_hat, values, indices, W_dec,
                  sizes, weights, resid)
        torch.library.opcheck(torch.ops.sparsecode.nested_prefix_loss_suffix_triton.default,
                              suffix)
        S = torch.ops.sparsecode.nested_prefix_loss_suffix_triton.default(*suffix)[0]
        torch.library.opcheck(torch.ops.sparsecode.nested_prefix_loss_pair_grads_triton.default,
                              (S, values, indices, W_dec, sizes))


def test_nested_loss_runs_its_walks_where_the_extension_has_no_kernels(monkeypatch, seed):
    """Without the extension's kernels for the device the triton backend still runs its walks,
    with grad_W_dec and grad_values from torch ops (sparse_grad.latent_rows_sum_dots), not the
    dense reference; float64, which the walks do not take, runs as the reference."""
    without_extension_kernels(monkeypatch)

    class NoReference:
        def __getattr__(self, name):
            raise AssertionError(f"the op ran reference.{name}")

    problem = nested_tests.make_problem(5, 32, 130, 8, torch.float32)
    x, values, indices, W_dec, b_dec, sizes, weights = problem
    leaves = [t.requires_grad_() for t in (x, values, W_dec, b_dec)]
    with monkeypatch.context() as patched:
        patched.setattr(nested_module, "reference", NoReference())
        outputs = nested_prefix_loss_and_decode(leaves[0], leaves[1], indices, leaves[2],
                                                leaves[3], sizes, weights, backend="triton")
    nested_tests.check_against_reference(outputs, leaves, indices, sizes, weights,
                                         TOLERANCE[torch.float32])

    as_float64 = [t.detach().double() for t in (x, values, W_dec, b_dec)]
    with monkeypatch.context() as patched:
        patched.setattr(nested_module, "reference", NoReference())
        with pytest.raises(AssertionError, match="the op ran reference"):
            nested_prefix_loss_and_decode(as_float64[0], as_float64[1], indices, as_float64[2],
                                          as_float64[3], sizes, weights, backend="triton")


def test_nested_loss_grad_x_keeps_its_bits_under_a_large_grad_x_hat(seed):
    """grad_x (the loss's gradient alone: x_hat does not depend on x) stays within float32's
    tolerance when the upstream grad_x_hat is a thousand times larger; adding grad_x_hat back to
    S = grad_x - grad_x_hat lost about 1e-4 of it (seen at B=8192 on an H100)."""
    x, values, indices, W_dec, b_dec, sizes, weights = nested_tests.make_problem(
        64, 33, 40, 5, torch.float32)
    leaves = [t.requires_grad_() for t in (x, values, W_dec, b_dec)]
    loss, _, x_hat = nested_prefix_loss_and_decode(leaves[0], leaves[1], indices, leaves[2],
                                                   leaves[3], sizes, weights, backend="triton")
    grad_x_hat = torch.randn_like(x_hat) * 1e3
    grad_x, = torch.autograd.grad((loss, x_hat), leaves[0], (torch.ones(()), grad_x_hat))
    x64, values64, W64, b64 = (t.detach().double().requires_grad_() for t in leaves)
    ref_loss, _ = reference.nested_prefix_loss(x64, values64, indices, W64, b64, sizes, weights)
    ref_grad_x, = torch.autograd.grad(ref_loss, x64)
    assert_close(grad_x, ref_grad_x, TOLERANCE[torch.float32], "grad x")


def test_nested_loss_of_an_empty_batch_matches_cpp(seed):
    """B = 0: the same outputs and gradients as the extension (a nan loss, zero gradients)."""
    problem = nested_tests.make_problem(1, 7, 40, 3, torch.float32)
    x, values, indices, W_dec, b_dec, sizes, weights = problem
    results = {}
    for backend in ("cpp", "triton"):
        leaves = [t[:0].clone().requires_grad_() for t in (x, values)]
        leaves += [t.clone().requires_grad_() for t in (W_dec, b_dec)]
        outputs = nested_prefix_loss_and_decode(leaves[0], leaves[1], indices[:0], leaves[2],
                                                leaves[3], sizes, weights, backend=backend)
        results[backend] = list(outputs) + list(torch.autograd.grad(outputs[0], leaves))
    for got, want in zip(results["triton"], results["cpp"]):
        assert got.shape == want.shape
        assert torch.equal(got, want) or (got.isnan().all() and want.isnan().all())


def test_nested_loss_rejects_what_it_cannot_run(seed):
    x, values, indices, W_dec, b_dec, _, _ = nested_tests.make_problem(3, 7, 40, 3, torch.float32)

    def run(sizes: list[int], weights: list[float]) -> None:
        nested_prefix_loss_and_decode(x, values, indices, W_dec, b_dec, sizes, weights,
                                      backend="triton")

    with pytest.raises(ValueError, match="strictly increasing"):
        run([5, 5, 40], [1.0] * 3)
    with pytest.raises(ValueError, match="last prefix size must equal d_sae = 40"):
        run([5, 39], [1.0] * 2)
    with pytest.raises(ValueError, match="one prefix weight per prefix size"):
        run([5, 40], [1.0])
    with pytest.raises(ValueError, match="at most 16 prefix sizes"):
        run(list(range(24, 41)), [1.0] * 17)
    with pytest.raises(ValueError, match="values and indices must be"):
        nested_prefix_loss_and_decode(x, values[:, :2], indices, W_dec, b_dec, [40], [1.0],
                                      backend="triton")
    huge = W_dec[:1].expand(2**27, -1)  # no memory: every row is the first one
    with pytest.raises(ValueError, match="d_sae < 2\\^27"):
        nested_prefix_loss_and_decode(x, values, indices, huge, b_dec, [2**27], [1.0],
                                      backend="triton")


def test_matryoshka_step_compiles_without_graph_breaks(seed):
    """torch.compile(fullgraph=True) fails on any graph break: the Triton launches sit inside
    registered custom ops with fake implementations, so the forward is one graph and the
    backward graph comes from the ops' autograd formulas."""
    from sparsecode import MatryoshkaSAE

    torch._dynamo.reset()
    sae = MatryoshkaSAE(32, 130, 8, [33, 130], backend="triton")
    x = torch.randn(5, 32)

    def forward(model: MatryoshkaSAE, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(batch)
        return out.loss, out.x_hat

    eager_loss, eager_x_hat = forward(sae, x)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad()
    loss, x_hat = torch.compile(forward, fullgraph=True, backend="aot_eager")(sae, x)
    loss.backward()
    assert_close(loss, eager_loss, 1e-6, "loss")
    assert_close(x_hat, eager_x_hat, 1e-6, "x_hat")
    for g, e in zip((p.grad for p in sae.parameters()), eager_grads):
        assert_close(g, e, 1e-6, "grad")


def test_encode_rejects_what_it_cannot_run(seed):
    x, W_enc, b_enc, b_dec = make_inputs(5, 7, 300, torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        ops.topk_encode(x, W_enc, b_enc, b_dec, 3, backend="triton")
    x, W_enc, b_enc, b_dec = (t.float() for t in (x, W_enc, b_enc, b_dec))
    with pytest.raises(ValueError, match="k must be in"):
        ops.topk_encode(x, W_enc, b_enc, b_dec, 257, backend="triton")
    with pytest.raises(ValueError, match="W_enc"):
        ops.topk_encode(x, W_enc[:5], b_enc, b_dec, 3, backend="triton")


def test_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
