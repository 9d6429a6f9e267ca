"""The triton backend on a CUDA device against the float64 reference (DESIGN.md §5).

Real sizes (B=8192; d_model, d_sae and k each take every value of the Triton issue's lists) in
float32, bfloat16 and float16; tiny awkward shapes and exact ties in bfloat16, which the CPU
interpreter cannot run; the nested-prefix loss (its Triton forward walk, and in bfloat16 its
tensor-core pass) at the benchmarks' size and the tiny shapes, and the tensor-core pass at its
own awkward shapes; the encode's result-preserving options against its default, and the walks
at every pipelining depth, at the benchmarks' size; and a torch.compile'd Matryoshka training
step against the eager one.
Marked ``gpu`` and skipped where torch sees no CUDA device.

Each shape and dtype compiles kernels, so the file checks a covering subset of the size grid
and checks the encode, its backward, the decode and its backward in one test per case. The
float64 references at B=8192, d_sae=65536 hold a few [B, d_sae] float64 matrices (4.3 GB each)
while a test runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from torch import Tensor

from sparsecode import MatryoshkaSAE, ops, reference
from sparsecode.optim import MasterWeightAdam
from sparsecode.nested_prefix_loss import nested_prefix_loss_and_decode
from tests.conftest import TOLERANCE, assert_close, exact_tie_inputs, lowest_ids_first
from tests.test_cuda_ops import random_code
from tests.test_nested_prefix_loss import check_against_reference, prefixes_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REAL_BATCH = 8192
# (d_model, d_sae, k): every value of each of d_model ∈ {768, 2304}, d_sae ∈ {16384, 65536},
# k ∈ {32, 64, 128} appears; the benchmarks' size (2304, 65536, 64) is one of them.
REAL_SIZES = [(768, 16384, 32), (2304, 65536, 64), (768, 65536, 128), (2304, 16384, 64)]
ISSUE_SIZE = (2304, 65536, 64)  # the benchmarks' size, where the nested loss is checked too
# (B, d_model, d_sae, k): every value of each of B ∈ {1, 5}, d_model ∈ {7, 32},
# d_sae ∈ {33, 130}, k ∈ {1, 3, 8} appears.
TINY_SIZES = [(1, 7, 33, 1), (5, 32, 130, 3), (5, 7, 130, 8), (1, 32, 33, 8), (5, 32, 33, 1)]


def triton_tolerance(dtype: torch.dtype) -> float:
    """The §5 bound for an output of a Triton kernel, whose float32 tl.dot may use tf32."""
    return 5e-4 if dtype == torch.float32 else TOLERANCE[dtype]


def selection_slack(dtype: torch.dtype) -> float:
    """How far below the k-th largest float64 pre-activation a selected one may lie, as a
    fraction of max|pre|: the kernel ranks pre-activations computed from x - b_dec rounded to
    the input dtype (about 4e-3 relative in 16 bits) with float32 or tf32 (5e-4) products."""
    return 1e-3 if dtype == torch.float32 else 1e-2


@contextlib.contextmanager
def poisoned_memory(enabled: bool = True) -> Iterator[None]:
    """While active, tensors torch allocates uninitialised (the kernels' outputs among them)
    start as NaN (ints as their max value), so an element a kernel never writes fails the
    comparison. Ops without a deterministic implementation only warn (warn_only)."""
    if not enabled:
        yield
        return
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling


def make_encoder(B: int, d: int, n: int, dtype: torch.dtype) -> list[Tensor]:
    """x [B, d], W_enc [d, n], b_enc [n], b_dec [d] on the GPU: random, never zero."""
    return [
        torch.randn(B, d, device=DEVICE).to(dtype),
        (torch.randn(d, n, device=DEVICE) / d**0.5).to(dtype),
        (0.1 * torch.randn(n, device=DEVICE)).to(dtype),
        (0.1 * torch.randn(d, device=DEVICE)).to(dtype),
    ]


def make_decoder(n: int, d: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """W_dec [n, d] with rows of norm about 1 and b_dec [d] on the GPU: random, never zero."""
    return (
        (torch.randn(n, d, device=DEVICE) / d**0.5).to(dtype),
        (0.1 * torch.randn(d, device=DEVICE)).to(dtype),
    )


def check_selection(pre: Tensor, indices: Tensor, k: int, slack: float) -> None:
    """indices [B, k] are int64, in range, sorted, distinct, and pick a top k of pre [B, n]
    (float64) up to slack * max|pre|."""
    B, n = pre.shape
    assert indices.dtype == torch.int64 and indices.shape == (B, k), (indices.dtype, indices.shape)
    # The range check comes first: an out-of-range index in gather would break the CUDA context.
    assert bool(((indices >= 0) & (indices < n)).all()), "indices out of range (unwritten?)"
    assert bool((indices[:, 1:] > indices[:, :-1]).all()), "indices not sorted and distinct"
    if k < n:
        chosen = pre.gather(1, indices).min(1).values
        others = pre.scatter(1, indices, float("-inf")).max(1).values
        margin = slack * pre.abs().max()
        worst = (others - chosen).max().item()
        assert bool((chosen >= others - margin).all()), (
            f"not a top-k: an unselected pre-activation beats a selected one by {worst:.3e} "
            f"> slack {margin.item():.3e}"
        )


def check_encode(inputs: list[Tensor], k: int, poison_backward: bool) -> tuple[Tensor, Tensor]:
    """ops.topk_encode (triton) of inputs = [x, W_enc, b_enc, b_dec] against float64.

    The selection must be a top k; values and the gradients of all four inputs are compared
    with the float64 reference at the kernel's own indices, so a near-tie that picked another
    latent cannot hide an error. Returns the kernel's values and indices [B, k].
    """
    dtype = inputs[0].dtype
    leaves = [t.clone().requires_grad_() for t in inputs]
    with poisoned_memory():
        values, indices = ops.topk_encode(*leaves, k, backend="triton")

    inputs64 = [t.double().requires_grad_() for t in inputs]
    x, W_enc, b_enc, b_dec = inputs64
    pre = (x - b_dec) @ W_enc + b_enc
    check_selection(pre.detach(), indices, k, selection_slack(dtype))
    ref_values = torch.relu(pre.gather(1, indices))
    del pre
    assert_close(values, ref_values, triton_tolerance(dtype), "encode values")

    grad = torch.randn_like(values)
    with poisoned_memory(poison_backward):
        grads = torch.autograd.grad(values, leaves, grad)
    ref_grads = torch.autograd.grad(ref_values, inputs64, grad.double())
    for name, g, ref in zip(["x", "W_enc", "b_enc", "b_dec"], grads, ref_grads):
        assert_close(g, ref, TOLERANCE[dtype], f"encode grad {name}")
    return values.detach(), indices


def check_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, poison_backward: bool
) -> None:
    """ops.sparse_decode (triton) of the code (values, indices [B, k]) and its gradients of
    values, W_dec [n, d] and b_dec [d] against the float64 reference's autograd."""
    dtype = values.dtype
    leaves = [t.clone().requires_grad_() for t in (values, W_dec, b_dec)]
    with poisoned_memory():
        x_hat = ops.sparse_decode(leaves[0], indices, leaves[1], leaves[2], backend="triton")
    inputs64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.sparse_decode(inputs64[0], indices, inputs64[1], inputs64[2])
    assert_close(x_hat, ref, triton_tolerance(dtype), "decode x_hat")

    grad = torch.randn_like(x_hat)
    with poisoned_memory(poison_backward):
        grads = torch.autograd.grad(x_hat, leaves, grad)
    ref_grads = torch.autograd.grad(ref, inputs64, grad.double())
    # grad_values is a Triton kernel; grad_W_dec and grad_b_dec come from the CUDA extension.
    tolerances = [triton_tolerance(dtype), TOLERANCE[dtype], TOLERANCE[dtype]]
    for name, g, r, tol in zip(["values", "W_dec", "b_dec"], grads, ref_grads, tolerances):
        assert_close(g, r, tol, f"decode grad {name}")


def check_nested(x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
                 sizes: list[int], poison_backward: bool) -> None:
    """ops' nested-prefix loss with its reconstruction (triton: the tensor-core pass where it
    takes the inputs, else the Triton walks; the extension's per-latent sum) and the gradients
    of x, values, W_dec and b_dec through all three outputs (the suffix sums made again) and
    through the loss alone (the forward's suffix sums), against the float64 reference's
    autograd."""
    weights = [1.0 + 0.5 * g for g in range(len(sizes))]
    leaves = [t.clone().requires_grad_() for t in (x, values, W_dec, b_dec)]
    for loss_only in (False, True):
        with poisoned_memory():
            outputs = nested_prefix_loss_and_decode(leaves[0], leaves[1], indices, leaves[2],
                                                    leaves[3], sizes, weights, backend="triton")
        check_against_reference(outputs, leaves, indices, sizes, weights, TOLERANCE[x.dtype],
                                backward=lambda: poisoned_memory(poison_backward),
                                label=f"nested{' (loss alone)' if loss_only else ''} ",
                                loss_only=loss_only)


def check_exact_ties(inputs: list[Tensor], values: Tensor, indices: Tensor, k: int) -> Tensor:
    """The code (values, indices [B, k]) of exact_tie_inputs keeps the lower latent id among
    equals and exact values; returns the float64 pre-activations [B, n]."""
    x, W_enc, b_enc, b_dec = (t.double() for t in inputs)
    pre = (x - b_dec) @ W_enc + b_enc
    assert torch.equal(indices, lowest_ids_first(pre, k)), "ties not broken by lower id"
    assert torch.equal(values.double(), torch.relu(pre.gather(1, indices))), "values not exact"
    return pre


@pytest.fixture(autouse=True)
def release_gpu_memory() -> Iterator[None]:
    """Hands the cached blocks of a test's large float64 references back between tests."""
    yield
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("d,n,k", REAL_SIZES)
def test_real_sizes(d: int, n: int, k: int, dtype: torch.dtype, seed: int) -> None:
    """Encode and decode, forward and backward, at B=8192 (backward not poisoned: the fast,
    default-mode backward is the one checked here)."""
    x = make_encoder(REAL_BATCH, d, n, dtype)
    values, indices = check_encode(x, k, poison_backward=False)
    check_decode(values, indices, *make_decoder(n, d, dtype), poison_backward=False)
    if (d, n, k) == ISSUE_SIZE:
        sizes = [n // 32, n // 16, n // 8, n // 4, n // 2, n]
        decoder = make_decoder(n, d, dtype)
        check_nested(x[0], values, indices, *decoder, sizes, poison_backward=False)
        if dtype == torch.bfloat16:  # the above took the Triton walk; now the tensor-core pass
            with pytest.MonkeyPatch.context() as switched:
                switched.setenv("SPARSECODE_TENSOR_CORES", "1")
                check_nested(x[0], values, indices, *decoder, sizes, poison_backward=False)


@pytest.mark.parametrize("B,d,n,k", TINY_SIZES)
def test_tiny_shapes_bf16(B: int, d: int, n: int, k: int, seed: int) -> None:
    """Sizes that are not multiples of any block, every output poisoned, in bfloat16."""
    dtype = torch.bfloat16
    x = make_encoder(B, d, n, dtype)
    values, indices = check_encode(x, k, poison_backward=True)
    check_decode(values, indices, *make_decoder(n, d, dtype), poison_backward=True)
    # Slots out of index order, as the nested loss's walk plan must sort them; the walks, and
    # with d = 32 the tensor-core pass as well.
    shuffle = torch.rand(B, k, device=DEVICE).argsort(dim=1)
    code = values.gather(1, shuffle), indices.gather(1, shuffle)
    decoder = make_decoder(n, d, dtype)
    check_nested(x[0], *code, *decoder, prefixes_for(n, k), poison_backward=True)
    if d % 8 == 0:
        with pytest.MonkeyPatch.context() as switched:
            switched.setenv("SPARSECODE_TENSOR_CORES", "1")
            check_nested(x[0], *code, *decoder, prefixes_for(n, k), poison_backward=True)


# (B, d_model, d_sae, k, prefix sizes) for the tensor-core pass: steps of 16 slots part empty
# (k = 1, 17, 33) and full (k = 32), lanes past d (d = 8, 24, 40), a second column tile mostly
# past d (264), blocks of 16 rows part empty, G = 1 to 8.
MMA_SHAPES = [
    (5, 264, 130, 17, [8, 20, 40, 130]),
    (33, 8, 40, 1, [5, 40]),
    (17, 24, 100, 33, [1, 2, 3, 4, 5, 6, 7, 100]),
    (20, 40, 300, 32, [300]),
]


@pytest.mark.parametrize("B,d,n,k,sizes", MMA_SHAPES)
def test_nested_loss_on_the_tensor_cores_bf16(B: int, d: int, n: int, k: int, sizes: list[int],
                                               seed: int, monkeypatch) -> None:
    """The bfloat16 nested loss through the tensor-core pass (which the test sees called, in
    the forward and in the backward under upstream gradients) against the reference, every
    output poisoned; its outputs are the same bits run to run (SPARSECODE_TENSOR_CORES=1)."""
    from sparsecode.triton_kernels import nested_prefix_loss as nested

    monkeypatch.setenv("SPARSECODE_TENSOR_CORES", "1")
    dtype = torch.bfloat16
    calls = []

    class Spy:
        def __getattr__(self, name: str):
            calls.append(name)
            return getattr(torch.ops.sparsecode_C, name)

    x = torch.randn(B, d, device=DEVICE).to(dtype)
    values, indices = random_code(B, n, k, dtype)
    shuffle = torch.rand(B, k, device=DEVICE).argsort(dim=1)
    code = values.gather(1, shuffle), indices.gather(1, shuffle)
    decoder = make_decoder(n, d, dtype)
    with mock.patch.object(nested, "compiled_kernels", lambda device: Spy()):
        check_nested(x, *code, *decoder, sizes, poison_backward=True)
        assert calls.count("nested_prefix_sums") == 3  # two forwards, one backward

        def outputs() -> list[Tensor]:
            with poisoned_memory():
                return list(nested.nested_prefix_loss_forward(x, *code, *decoder, sizes,
                                                              [1.0] * len(sizes)))

        first = outputs()
        assert all(torch.equal(a, b) for a, b in zip(outputs(), first, strict=True))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_exact_ties_bf16(k: int, seed: int) -> None:
    """Small-integer inputs make every pre-activation an exact integer in bfloat16 with float32
    accumulation, so rows are full of exact ties: the values must be exact, the kernel must keep
    the lower latent id among equals, and the reconstruction must match."""
    d, n, dtype = 16, 40, torch.bfloat16
    inputs = exact_tie_inputs(9, d, n, dtype, DEVICE)
    with poisoned_memory():
        values, indices = ops.topk_encode(*inputs, k, backend="triton")
    pre = check_exact_ties(inputs, values, indices, k)
    check_selection(pre, indices, k, slack=0.0)
    check_decode(values, indices, *make_decoder(n, d, dtype), poison_backward=True)


# Fused-encode options that must not change its result (EncodeConfig fields), with the dtype
# each is checked in (the keyed 16-bit path and float32's value ranking).
ENCODE_OPTIONS = [
    pytest.param({"unchecked_steps": 16}, torch.bfloat16, id="unchecked16-bfloat16"),
    pytest.param({"unchecked_steps": 128}, torch.bfloat16, id="unchecked128-bfloat16"),
    pytest.param({"unchecked_steps": 128}, torch.float32, id="unchecked128-float32"),
]


@pytest.mark.parametrize("option,dtype", ENCODE_OPTIONS)
def test_encode_options_match_the_default(option: dict, dtype: torch.dtype, seed: int) -> None:
    """Insertion steps before the test across warps give the values and indices of the default
    tiles without them, bit for bit, at the benchmarks' size (every output poisoned)."""
    from sparsecode.triton_kernels import topk_encode as module

    d, n, k = ISSUE_SIZE
    inputs = make_encoder(REAL_BATCH, d, n, dtype)
    base = module.default_config(inputs[0], inputs[1])
    expected = module.topk_encode_forward(*inputs, k, base)
    with poisoned_memory():
        values, indices = module.topk_encode_forward(*inputs, k,
                                                     dataclasses.replace(base, **option))
    assert torch.equal(indices, expected[1])
    assert torch.equal(values, expected[0])


# float16 compiles as bfloat16 does, register cap included; float32 tiles are not capped.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda t: str(t).removeprefix("torch."))
def test_walks_give_the_same_bits_at_every_pipelining_depth(dtype: torch.dtype,
                                                            seed: int) -> None:
    """The gathers' pipelining depth, which the autotuner picks (sparse_decode.autotuned), only
    moves loads: the decode, its grad_values and the nested loss's forward walk give the same
    bits at every depth their autotuners try, at the benchmarks' size (every output
    poisoned)."""
    from sparsecode.triton_kernels import nested_prefix_loss as nested
    from sparsecode.triton_kernels import sparse_decode as decode

    d, n, k = ISSUE_SIZE
    sizes = [n // 32, n // 16, n // 8, n // 4, n // 2, n]
    weights = [1.0 + 0.5 * g for g in range(len(sizes))]
    W_dec, b_dec = make_decoder(n, d, dtype)
    values, indices = random_code(REAL_BATCH, n, k, dtype)
    shuffle = torch.rand(REAL_BATCH, k, device=DEVICE).argsort(dim=1)  # slots out of order
    values, indices = values.gather(1, shuffle), indices.gather(1, shuffle)
    x, grad_out = (torch.randn(REAL_BATCH, d, device=DEVICE).to(dtype) for _ in range(2))

    def decode_outputs(stages: int) -> list[Tensor]:
        with poisoned_memory():
            return [decode.sparse_decode_forward(values, indices, W_dec, b_dec, stages=stages),
                    decode.sparse_decode_grad_values(grad_out, indices, W_dec, stages=stages)]

    def forward_outputs(stages: int) -> list[Tensor]:
        with poisoned_memory():
            return list(nested.nested_prefix_loss_forward(x, values, indices, W_dec, b_dec,
                                                          sizes, weights, stages=stages))

    # Each walk at the depths its autotuner tries, against depth 1.
    for outputs, depths in ((decode_outputs, decode.DECODE_STAGES),
                            (forward_outputs, nested.NESTED_STAGES)):
        expected = outputs(1)
        for stages in depths[1:]:
            for position, (got, want) in enumerate(zip(outputs(stages), expected, strict=True)):
                assert torch.equal(got, want), (
                    f"{outputs.__name__} output {position} differs at STAGES={stages}")


@pytest.mark.parametrize("nested_backend", ["triton", "cuda"])
def test_training_step_ops_do_not_synchronise(nested_backend: str, seed: int) -> None:
    """The ops of a Matryoshka training step (Triton encode, the nested loss with its decode on
    either backend, their backward, MasterWeightAdam's step) never make the host wait for the
    GPU, so the host can queue a step while the GPU runs the last: torch's sync debug mode
    raises on a synchronising call (a copy from pageable memory, .item(), a host-side check).
    The module's input check is left out: its finite check is one synchronisation by design."""
    d_model, d_sae, k, batch = 256, 4096, 32, 2048
    sae = MatryoshkaSAE(d_model, d_sae, k, [512, 1024, 2048, 4096], backend="triton",
                        device=DEVICE, dtype=torch.bfloat16)
    opt = MasterWeightAdam(sae.parameters(), lr=1e-3)
    x = torch.randn(batch, d_model, device=DEVICE, dtype=torch.bfloat16)

    def step() -> None:
        opt.zero_grad()
        values, indices = ops.topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, k,
                                          backend="triton")
        loss, _, _ = nested_prefix_loss_and_decode(x, values, indices, sae.W_dec, sae.b_dec,
                                                   sae.prefix_sizes, sae.prefix_weights,
                                                   backend=nested_backend)
        loss.backward()
        opt.step()

    step()  # compiles the kernels and warms the allocators
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_side_stream_steps_match_and_do_not_synchronise(seed: int) -> None:
    """MasterWeightAdam(step_in_backward=True, side_stream=True): three Matryoshka steps give
    the weights of the steps taken on the backward's own stream, bit for bit (every kernel of
    the step is deterministic), and a step never makes the host wait for the GPU."""
    d_model, d_sae, k, batch = 256, 4096, 32, 2048
    xs = [torch.randn(batch, d_model, device=DEVICE, dtype=torch.bfloat16) for _ in range(3)]
    trained = []
    for side_stream in (False, True):
        torch.manual_seed(seed)
        sae = MatryoshkaSAE(d_model, d_sae, k, [512, 1024, 2048, 4096], backend="triton",
                            device=DEVICE, dtype=torch.bfloat16)
        opt = MasterWeightAdam(sae.parameters(), lr=1e-3, step_in_backward=True,
                               side_stream=side_stream)
        for step, x in enumerate(xs):
            values, indices = ops.topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, k,
                                              backend="triton")
            loss, _, _ = nested_prefix_loss_and_decode(x, values, indices, sae.W_dec, sae.b_dec,
                                                       sae.prefix_sizes, sae.prefix_weights,
                                                       backend="triton")
            if step == len(xs) - 1:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert all(p.grad is None for p in sae.parameters())
        assert all(opt.state[p]["step"] == len(xs) for p in sae.parameters())
        trained.append([p.detach().clone() for p in sae.parameters()])
    for (name, _), a, b in zip(sae.named_parameters(), *trained, strict=True):
        assert torch.equal(a, b), f"{name} differs with side_stream=True"


def test_compiled_training_step_matches_eager(seed: int) -> None:
    """torch.compile(fullgraph=True) of a MatryoshkaSAE's loss on the triton backend runs
    without graph breaks, and two Adam steps through it match two eager steps: same losses,
    same gradients, same parameters (float32; the same kernels run in both)."""
    d_model, d_sae, k, batch = 256, 4096, 32, 2048
    torch._dynamo.reset()
    eager = MatryoshkaSAE(d_model, d_sae, k, [512, 1024, 2048, 4096], backend="triton",
                          device=DEVICE)
    compiled = copy.deepcopy(eager)
    x = torch.randn(batch, d_model, device=DEVICE)
    losses = {
        "eager": lambda x: eager(x).loss,
        "compiled": torch.compile(lambda x: compiled(x).loss, fullgraph=True),
    }
    models = {"eager": eager, "compiled": compiled}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    tol = TOLERANCE[torch.float32]
    for step in range(2):
        loss = {}
        for name, model in models.items():
            optimizers[name].zero_grad()
            loss[name] = losses[name](x)
            loss[name].backward()
        assert_close(loss["compiled"], loss["eager"], tol, f"step {step} loss")
        for (param, p_compiled), p_eager in zip(compiled.named_parameters(), eager.parameters()):
            assert_close(p_compiled.grad, p_eager.grad, tol, f"step {step} grad {param}")
        for opt in optimizers.values():
            opt.step()
    for (param, p_compiled), p_eager in zip(compiled.named_parameters(), eager.parameters()):
        assert_close(p_compiled, p_eager, tol, f"parameter {param} after two steps")
