"""sparsecode: fast TopK and Matryoshka sparse autoencoders for interpretability."""

from sparsecode import ops, reference
from sparsecode.backends import BackendUnavailableError, backends
from sparsecode.sae import SAE, MatryoshkaSAE, SAEOutput, SparseCode, TopKSAE
from sparsecode.saving import load

__all__ = [
    "SAE",
    "BackendUnavailableError",
    "MatryoshkaSAE",
    "SAEOutput",
    "SparseCode",
    "TopKSAE",
    "backends",
    "load",
    "ops",
    "reference",
]
__version__ = "0.1.0"
