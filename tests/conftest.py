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


# Modules whose tests run whole recipes, several processes or real 135M-parameter models: the
# default suite runs them, the fast tier (`make test-fast`, `-m fast`) leaves them out.
HEAVY_MODULES = {
    "test_recipes",
    "test_recipe_parity",
    "test_distributed_recipes",
    "test_distributed_methods",
    "test_distributed_primitives",
    "test_checkpoint_bundled",
    "test_model_parity",
    "test_benchmarks",
    "test_datasets_cli",
    "test_gguf_import",
}


def pytest_collection_modifyitems(config, items):
    """The one place markers are applied: ``gpu`` tests skip themselves without CUDA, and every
    test that is not slow, not gpu and not in a heavy module gets ``fast``."""
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        if "slow" not in item.keywords and "gpu" not in item.keywords and module not in HEAVY_MODULES:
            item.add_marker(pytest.mark.fast)
