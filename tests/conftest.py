"""Shared pytest setup for tinytune.

Sets environment switches that must be in place before any tinytune module is imported:
Triton's interpreter on machines without CUDA (kernels are decorated at import time) and
offline mode for Hugging Face libraries (tests never fetch from a hub).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "TINYTUNE_HOME" not in os.environ:  # token caches and converted models of tests stay out of ~/.cache
    import atexit
    import shutil
    import tempfile

    os.environ["TINYTUNE_HOME"] = tempfile.mkdtemp(prefix="tinytune_test_home_")
    atexit.register(shutil.rmtree, os.environ["TINYTUNE_HOME"], True)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct as an HF-format dir, converted once per session in a temp TINYTUNE_HOME."""
    from tinytune.checkpoint.bundled import ensure_smollm2

    return ensure_smollm2(home=str(tmp_path_factory.mktemp("tinytune_home")))
