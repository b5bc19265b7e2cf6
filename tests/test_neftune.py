"""NEFTune: same noise as transformers' hook (same RNG draws), training only; the recipe key."""

import pytest
import torch

from tinytune.models.smollm2 import smollm2_tiny
from tinytune.training.neftune import activate_neftune


def test_neftune_matches_transformers_hook_and_is_off_in_eval():
    neftune = pytest.importorskip("transformers.integrations.neftune")
    torch.manual_seed(0)
    model = smollm2_tiny()
    tokens = torch.randint(0, 200, (2, 9))
    clean = model.tok_embeddings(tokens)
    handle = activate_neftune(model, 5.0)
    model.train()
    torch.manual_seed(1)
    ours = model.tok_embeddings(tokens)
    emb = torch.nn.Embedding.from_pretrained(model.tok_embeddings.weight.detach().clone(), freeze=False)
    emb.neftune_noise_alpha = 5.0
    emb.register_forward_hook(neftune.neftune_post_forward_hook)
    emb.train()
    torch.manual_seed(1)
    want = emb(tokens)
    torch.testing.assert_close(ours, want)
    noise = ours - clean
    bound = 5.0 / (9 * clean.shape[-1]) ** 0.5
    assert noise.abs().max() <= bound + 1e-7 and noise.abs().max() > 0.5 * bound
    model.eval()  # evaluation and generation see clean embeddings
    torch.testing.assert_close(model.tok_embeddings(tokens), clean)
    with torch.no_grad():
        a, b = model(tokens), model(tokens)
    torch.testing.assert_close(a, b)
    handle.remove()
    model.train()
    torch.testing.assert_close(model.tok_embeddings(tokens), clean)
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        activate_neftune(model, 0.0)


def test_neftune_on_a_sequence_sharded_dtensor_output_draws_like_one_device():
    """Tensor/sequence parallel embedding outputs are DTensors: the hook keeps the placement and adds the
    default generator's draws for the global [b, s, d], as one device does. A one-rank mesh here; the
    two-rank case (where DTensor's own RNG would differ) is tests/test_distributed_methods.py."""
    from torch.distributed.tensor import DTensor, Shard

    from tinytune.distributed.mesh import ParallelDims, build_device_mesh, process_group

    with process_group("cpu") as info:
        mesh = build_device_mesh(ParallelDims.from_config(info.world_size), "cpu").world["tp"]
        torch.manual_seed(0)
        emb = torch.nn.Embedding(50, 16)
        tokens = torch.randint(0, 50, (2, 7))
        clean = emb(tokens).detach()
        # as tensor parallelism's output hook: this rank's sequence shard (the whole sequence on a 1-rank mesh)
        emb.register_forward_hook(lambda m, a, out: DTensor.from_local(out, mesh, [Shard(1)]))
        activate_neftune(_Holder(emb), 5.0)
        torch.manual_seed(3)
        noisy = emb(tokens)
        torch.manual_seed(3)
        want = clean + torch.zeros_like(clean).uniform_(-5.0 / (7 * 16) ** 0.5, 5.0 / (7 * 16) ** 0.5)
        assert noisy.placements == (Shard(1),)
        torch.testing.assert_close(noisy.full_tensor(), want)
        emb.eval()
        torch.testing.assert_close(emb(tokens).full_tensor(), clean)


class _Holder(torch.nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.tok_embeddings = emb
