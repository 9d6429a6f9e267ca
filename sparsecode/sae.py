"""TopK and Matryoshka sparse autoencoders as drop-in ``torch.nn.Module``s.

    pre   = (x - b_dec) @ W_enc + b_enc          W_enc [d_model, d_sae], b_enc [d_sae]
    code  = TopK(ReLU(pre))                      values, indices [B, k]
    x_hat = code @ W_dec + b_dec                 W_dec [d_sae, d_model], b_dec [d_model]

A Matryoshka SAE with prefix sizes m_0 < ... < m_{G-1} = d_sae trains every prefix of the
dictionary to reconstruct on its own: loss = sum_g w_g * mean_b ||x - x_hat_g||^2, where
x_hat_g decodes the code restricted to latents < m_g. A TopK SAE is the case G = 1.

With ``activation="batchtopk"`` the code keeps the B*k largest activations of the whole
batch instead of k per row (see :mod:`sparsecode.batch_topk`); in eval mode it keeps the
activations above a threshold learnt in training (an exponential moving average of each
batch's smallest kept activation), up to ``k_max`` per row.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from sparsecode import batch_topk
from sparsecode.backends import check_backend_name
from sparsecode.nested_prefix_loss import nested_prefix_loss_and_decode
from sparsecode.sparse_decode import sparse_decode
from sparsecode.topk_encode import topk_encode


ACTIVATIONS = ("topk", "batchtopk")
# Weight of the old threshold in the moving average of a BatchTopK SAE's threshold.
THRESHOLD_DECAY = 0.999


class SparseCode(NamedTuple):
    """A batch's sparse code: values [B, k] (>= 0) at latents indices [B, k] (int64, sorted).

    A BatchTopK code has k_max slots per row in eval mode, and in training as many as its
    fullest row keeps (kept slots first, in index order); unkept slots hold zero."""

    values: Tensor
    indices: Tensor


class SAEOutput(NamedTuple):
    """x_hat [B, d_model] (full reconstruction), the code, loss [] and prefix_losses [G]."""

    x_hat: Tensor
    code: SparseCode
    loss: Tensor
    prefix_losses: Tensor


def _as_int(value: object) -> int | None:
    """value as a Python int when it is an integer (numpy ints included, bools not)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_activation(activation: str, k: int, k_max: int | None, d_sae: int) -> int:
    """The per-row cap of activation's code (k for TopK); raises on a bad combination."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "topk":
        if k_max is not None:
            raise ValueError("k_max is for activation='batchtopk'; TopK keeps exactly k per row")
        return k
    if k_max is None:
        return min(4 * k, d_sae)
    if _as_int(k_max) is None or not k <= k_max <= d_sae:
        raise ValueError(f"k_max must be an int in [k={k}, d_sae={d_sae}], got {k_max!r}")
    return int(k_max)


def _check_prefixes(
    d_sae: int, prefix_sizes: Sequence[int], prefix_weights: Sequence[float] | None
) -> tuple[list[int], list[float]]:
    sizes = [_as_int(m) for m in prefix_sizes]
    if not sizes or None in sizes:
        raise ValueError(f"prefix_sizes must be a non-empty list of ints, got {prefix_sizes!r}")
    if sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(
            f"prefix_sizes must be strictly increasing positive ints, got {sizes}"
        )
    if sizes[-1] != d_sae:
        raise ValueError(
            f"the last prefix size must equal d_sae={d_sae} (the whole dictionary), got {sizes}; "
            f"append {d_sae}"
        )
    if prefix_weights is None:
        return sizes, [1.0 / len(sizes)] * len(sizes)
    weights = [float(w) for w in prefix_weights]
    if len(weights) != len(sizes):
        raise ValueError(
            f"prefix_weights needs one weight per prefix size ({len(sizes)}), got {len(weights)}"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"prefix_weights must be finite and non-negative, got {weights}")
    return sizes, weights


class SAE(nn.Module):
    """A TopK sparse autoencoder trained with nested prefix losses (see the module doc).

    Parameters follow SAELens: W_enc [d_model, d_sae], b_enc [d_sae], W_dec [d_sae, d_model],
    b_dec [d_model]. Use :class:`TopKSAE` or :class:`MatryoshkaSAE` to build one.
    activation: "topk" (k per row) or "batchtopk" (B*k per batch, each row capped at k_max,
    default 4*k); a BatchTopK SAE has the buffer ``threshold`` (-1 until trained) and, after
    each training batch, ``rows_over_k_max``: how many rows lost activations to the cap.
    ``metadata`` holds where a loaded SAE came from (hook_name, model_name, ...; see
    :func:`sparsecode.load`), empty for a new one.
    """

    def __init__(
        self,
        d_model: int,
        d_sae: int,
        k: int,
        prefix_sizes: Sequence[int],
        prefix_weights: Sequence[float] | None = None,
        backend: str = "auto",
        *,
        activation: str = "topk",
        k_max: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_sae", d_sae), ("k", k)):
            if _as_int(value) is None or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        d_model, d_sae, k = int(d_model), int(d_sae), int(k)
        if k > d_sae:
            raise ValueError(f"k={k} must be at most d_sae={d_sae}: lower k or widen the SAE")
        self.prefix_sizes, self.prefix_weights = _check_prefixes(d_sae, prefix_sizes, prefix_weights)
        check_backend_name(backend)
        self.d_model, self.d_sae, self.k, self.backend = d_model, d_sae, k, backend
        self.activation, self.k_max = activation, _check_activation(activation, k, k_max, d_sae)
        self.metadata: dict[str, Any] = {}
        if activation == "batchtopk":
            self.register_buffer("threshold", torch.tensor(-1.0, device=device))
            self.rows_over_k_max: Tensor | None = None

        factory = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(d_model, d_sae, **factory))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **factory))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_model, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Unit-norm random decoder rows, W_enc = W_dec.T, zero biases."""
        with torch.no_grad():
            nn.init.normal_(self.W_dec)
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
            self.W_enc.copy_(self.W_dec.T)
            self.b_enc.zero_()
            self.b_dec.zero_()

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_sae={self.d_sae}, k={self.k}, "
            f"prefix_sizes={self.prefix_sizes}, backend={self.backend!r}"
            + (f", activation='batchtopk', k_max={self.k_max}" if self.activation == "batchtopk" else "")
        )

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor [batch, d_model], got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(
                f"x must have shape [batch, d_model={self.d_model}], got {list(x.shape)}; "
                "flatten leading dims with x.reshape(-1, d_model)"
            )
        if x.shape[0] == 0:
            raise ValueError("x is an empty batch (0 rows): pass at least one activation vector")
        if x.dtype != self.W_enc.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the SAE's parameters are {self.W_enc.dtype}; "
                f"cast with x.to({self.W_enc.dtype})"
            )
        if x.device != self.W_enc.device:
            raise ValueError(
                f"x is on {x.device} but the SAE is on {self.W_enc.device}; "
                f"move one of them, e.g. x.to('{self.W_enc.device}')"
            )
        # A finite sum proves every entry finite in one cheap pass; only an overflowing (or
        # non-finite) sum needs the entrywise check.
        if (
            not torch.compiler.is_compiling()
            and not bool(torch.isfinite(x.sum()))
            and not bool(torch.isfinite(x).all())
        ):
            raise ValueError("x contains NaN or Inf values: clean or drop those activations")

    def encode(self, x: Tensor) -> SparseCode:
        """The sparse code of x [B, d_model]: values, indices [B, k] (indices sorted per row);
        [B, k_max] (or k_max + 1 in training) with zeros where BatchTopK keeps nothing."""
        self._check_input(x)
        return self.encode_prefix(x, self.d_sae)

    def encode_prefix(self, x: Tensor, size: int) -> SparseCode:
        """The code of x [B, d_model] (already checked) chosen among the first `size` latents
        only, as the SAE pruned to them would encode: k, k_max capped at size. Only the full
        width (size = d_sae) moves a BatchTopK SAE's threshold in training."""
        W_enc, b_enc = self.W_enc, self.b_enc
        if size < self.d_sae:
            W_enc, b_enc = W_enc[:, :size], b_enc[:size]
        k = min(self.k, size)
        if self.activation == "topk":
            return SparseCode(*topk_encode(x, W_enc, b_enc, self.b_dec, k, backend=self.backend))
        by_threshold = not self.training and float(self.threshold) >= 0
        k_max = min(self.k_max, size)
        candidates = k_max if by_threshold else min(k_max + 1, size)
        values, indices = topk_encode(x, W_enc, b_enc, self.b_dec, candidates, backend=self.backend)
        if by_threshold:
            return SparseCode(values * (values > self.threshold).to(values.dtype), indices)
        chosen = batch_topk.select(values, x.shape[0] * k, probe=candidates > k_max)
        if self.training and size == self.d_sae:
            self._update_threshold(chosen)
        kept = values * chosen.keep.to(values.dtype)
        if torch.compiler.is_compiling():
            return SparseCode(kept, indices)
        return SparseCode(*batch_topk.compact(kept, indices, chosen.keep))

    @torch.no_grad()
    def _update_threshold(self, chosen: batch_topk.BatchSelection) -> None:
        """Moves the threshold towards the batch's smallest kept activation."""
        self.rows_over_k_max = chosen.rows_over_cap
        smallest = chosen.smallest_kept.to(self.threshold.dtype)
        moved = THRESHOLD_DECAY * self.threshold + (1 - THRESHOLD_DECAY) * smallest
        updated = torch.where(self.threshold < 0, smallest, moved)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), updated, self.threshold))

    def decode(self, code: SparseCode, size: int | None = None) -> Tensor:
        """x_hat [B, d_model] from the code, using only latents < size when size is given."""
        values, indices = code
        if size is not None:
            if _as_int(size) is None or not 1 <= size <= self.d_sae:
                raise ValueError(f"size must be an int in [1, d_sae={self.d_sae}], got {size!r}")
            values = values * (indices < size).to(values.dtype)
        return sparse_decode(values, indices, self.W_dec, self.b_dec, backend=self.backend)

    def forward(self, x: Tensor) -> SAEOutput:
        """Encode x [B, d_model], decode it, and compute the nested prefix losses.

        The reconstruction comes from the same pass over the code as the losses.
        """
        code = self.encode(x)
        loss, prefix_losses, x_hat = nested_prefix_loss_and_decode(
            x, code.values, code.indices, self.W_dec, self.b_dec,
            self.prefix_sizes, self.prefix_weights, backend=self.backend,
        )
        return SAEOutput(x_hat, code, loss, prefix_losses)

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        hook_name: str | None = None,
        model_name: str | None = None,
        activation_scale: float = 1.0,
        training_tokens: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Saves the SAE as a SAELens folder (cfg.json, sae_weights.safetensors) at path.

        The keywords are :func:`sparsecode.saving.save_sae`'s; load it with
        :func:`sparsecode.load`. Returns the folder's absolute path.
        """
        from sparsecode.saving import save_sae  # saving imports this module

        return save_sae(
            self, path, hook_name=hook_name, model_name=model_name,
            activation_scale=activation_scale, training_tokens=training_tokens, extra=extra,
        )


class MatryoshkaSAE(SAE):
    """A Matryoshka SAE: every prefix ``W_dec[:m]`` for m in prefix_sizes is trained as an SAE.

    prefix_sizes: strictly increasing, last equal to d_sae. prefix_weights: one non-negative
    weight per prefix, default uniform 1/G.
    """


class TopKSAE(SAE):
    """An ordinary TopK SAE: a Matryoshka SAE with the single prefix [d_sae]."""

    def __init__(
        self,
        d_model: int,
        d_sae: int,
        k: int,
        backend: str = "auto",
        *,
        activation: str = "topk",
        k_max: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            d_model, d_sae, k, [d_sae], None, backend,
            activation=activation, k_max=k_max, dtype=dtype, device=device,
        )
