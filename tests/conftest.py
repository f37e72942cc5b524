"""Test-wide settings: offline, CPU, one thread, repo importable."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))

import torch  # noqa: E402

torch.set_num_threads(1)
# The Triton kernels run under the interpreter on CPU. It must be set before anything imports
# triton (transformers does, indirectly), so here rather than in tests/kernels/conftest.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def umask_022():
    """A umask of 022 for the test: under the user's own (077, say), the 0600 that mkstemp and
    safetensors leave equals what the code must leave (0666 & ~umask), and a mode check proves nothing."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)
