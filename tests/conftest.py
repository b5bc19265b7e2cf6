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


@pytest.fixture
def cpu_gemm_calls(monkeypatch):
    """``use(name)`` sets the fp32 CPU GEMM back end for this test (restored afterwards; skips where
    oneDNN is missing and ``name`` needs it) and returns the list each oneDNN product appends to."""
    from tinytune.kernels import cpu_gemm

    saved, calls, real = dict(cpu_gemm._STATE), [], cpu_gemm._lp
    monkeypatch.setattr(cpu_gemm, "_lp", lambda x, w, b=None, out=None: calls.append(1) or real(x, w, b, out=out))

    def use(name: str) -> list:
        if name != "torch" and not cpu_gemm.onednn_available():
            pytest.skip("this PyTorch build has no oneDNN matmul")
        cpu_gemm.set_cpu_gemm(name)
        return calls

    yield use
    cpu_gemm._STATE.update(saved)


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
    "test_recipes_precision",
    "test_distributed_recipes",
    "test_distributed_methods",
    "test_distributed_primitives",
    "test_checkpoint_bundled",
    "test_model_parity",
    "test_benchmarks",
    "test_datasets_cli",
    "test_gguf_import",
    "test_gguf_export",
}

# Single tests (all their parametrisations) that are too slow for the fast tier (>= ~7 s each on 2
# busy cores: whole recipes, subprocesses, real 135M models, every official template, interpreted
# Triton kernels). `make test-fast` stays under 3 minutes; the default suite still runs them.
HEAVY_TESTS = {
    "test_pipeline_parallel::test_pp2_full_matches_single_device",
    "test_pipeline_parallel::test_pp2_lora_gpipe_resume_matches_single_device",
    "test_reliability::test_sigkill_at_random_points_then_resume_is_byte_identical",
    "test_reliability::test_raised_max_steps_extends_the_lr_schedule",
    "test_generation::test_cache_equals_no_cache_and_padding_equals_alone",
    "test_templates_fidelity::test_every_official_template_is_token_and_mask_exact",
    "test_templates_fidelity::test_qwen3_enable_thinking_modes_against_reference",
    "test_templates_configs::test_hf_configs_equal_builtin_on_bundled_data",
    "test_padding_free::test_loss_and_gradients_equal_the_padded_batch",
    "test_preference_losses::test_grad_accumulation_kx1_equals_bs_k",
    "test_preference_losses::test_dpo_eval_matches_plain_computation_and_max_batches",
    "test_kernels_attention::test_packed_documents_equal_each_document_alone",
    "test_document_attention::test_gradcheck_fp64",
    "test_tokenizers_api::test_vocab_json_merges_txt_dir_matches_tokenizer_json",
    "test_tokenizers_parity::test_load_tokenizer_from_gguf_equals_converted_dir",
    "test_tokenizers_parity::test_smollm2_gguf_matches_hf_on_converted_json",
    "test_recipes_hub::test_streaming_resume_equals_uninterrupted",
    "test_recipes_hub::test_mix_resume_equals_uninterrupted_and_records_served_counts",
    "test_datasets_fastpath::test_fast_path_equals_whole_string_reference",
    "test_cli::test_run_torchrun_two_processes",
    "test_kto::test_kto_recipe_first_step_and_validation",
    "test_compiled_ops::test_compiled_bodies_match_eager_and_the_fp64_reference",
    "test_compiled_ops::test_model_loss_and_gradients_do_not_move_under_compile",
    "test_compiled_ops::test_recipe_with_compile_true_trains_the_same_losses",
}


def pytest_collection_modifyitems(config, items):
    """The one place markers are applied: ``gpu`` tests skip themselves without CUDA, and every
    test that is not slow, not gpu, not in a heavy module and not a heavy test gets ``fast``."""
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        heavy = module in HEAVY_MODULES or f"{module}::{getattr(item, 'originalname', item.name)}" in HEAVY_TESTS
        if "slow" not in item.keywords and "gpu" not in item.keywords and not heavy:
            item.add_marker(pytest.mark.fast)
