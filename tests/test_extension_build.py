"""How the C++ extension is linked: against the process's shared libstdc++, never a private copy.

A compiler whose own library folders hold only libstdc++.a (the GPU image's /opt/gcc g++
wrapper: even -lstdc++ linked the archive) used to put a second libstdc++ into sparsecode._C.
Its locale facets clashed with those of the libstdc++ that torch loads, and every error message
of ours that formatted a number crashed the process. CMakeLists.txt now links the compiler's
libstdc++.so.6 by its path; this checks the built extension.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from sparsecode import _C


def needed_libraries(path: str) -> list[str]:
    """The DT_NEEDED entries of the ELF shared object at `path`, by readelf."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    out = subprocess.run([readelf, "-d", path], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks an ELF extension")
def test_extension_links_the_shared_libstdcxx():
    needed = needed_libraries(_C.__file__)
    assert any(name.startswith("libstdc++.so") for name in needed), (
        f"sparsecode._C does not link the shared libstdc++ (it needs {needed}): it carries its "
        "own copy, which breaks number formatting in its error messages; rebuild it with a "
        "compiler that links libstdc++ dynamically"
    )


def test_error_messages_format_numbers():
    """An argument check whose message formats numbers raises (it crashed with two copies)."""
    values, indices = torch.rand(2, 3), torch.tensor([[0, 1, 2], [0, 1, 10]])
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, d_sae=10\)"):
        torch.ops.sparsecode_C.sparse_decode_forward(values, indices, torch.randn(10, 4),
                                                     torch.zeros(4))
