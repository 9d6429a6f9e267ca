"""The hot-path ops of sparsecode, each with a ``backend`` keyword (see sparsecode.backends).

Same names and signatures as :mod:`sparsecode.reference`, which they are tested against.
"""

from sparsecode.nested_prefix_loss import nested_prefix_loss
from sparsecode.sparse_decode import sparse_decode
from sparsecode.topk_encode import topk_encode

__all__ = ["nested_prefix_loss", "sparse_decode", "topk_encode"]
