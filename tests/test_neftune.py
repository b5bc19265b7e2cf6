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
