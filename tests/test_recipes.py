"""Recipes end to end through `tune run` on a tiny model, tokenizer and data (CPU, seconds each).

Each run is checked against an independent computation: plain-PyTorch training loops, direct
formulas, the HF-checkpoint round trip, or an uninterrupted run.
"""

import io
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from _recipe_fixtures import QA, make_tiny_checkpoint, write_chat_jsonl, write_preference_jsonl

from tinytune.cli.main import main as tune_main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    ckpt = make_tiny_checkpoint(str(root / "tiny_model"))
    return {
        "root": root,
        "ckpt": ckpt,
        "chat": write_chat_jsonl(str(root / "chat.jsonl")),
        "pairs": write_preference_jsonl(str(root / "pairs.jsonl")),
    }


@pytest.fixture(autouse=True)
def _env(assets, monkeypatch):
    monkeypatch.setenv("TINYTUNE_HOME", str(assets["root"] / "home"))  # data token cache lives here


def _sft_cfg(assets, out, **over):
    cfg = {
        "output_dir": str(out),
        "checkpoint_dir": assets["ckpt"],
        "device": "cpu",
        "dtype": "fp32",
        "seed": 0,
        "template": "chatml",
        "dataset": {
            "_component_": "tinytune.datasets.chat_dataset",
            "source": assets["chat"],
            "template": "chatml",
            "max_seq_len": 64,
            "num_workers": 1,
        },
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "shuffle": False,
        "max_steps": 3,
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
        "lr_scheduler": {"name": "constant"},
        "clip_grad_norm": None,
        "metric_loggers": ["jsonl"],
        "resume_from_checkpoint": None,
    }
    cfg.update(over)
    return cfg


def _run(recipe, cfg, tmp_path, *extra):
    path = tmp_path / f"{recipe}_{abs(hash(json.dumps(cfg, sort_keys=True, default=str))) % 10**8}.yaml"
    with open(path, "w") as f:
        f.write(f"# recipe: {recipe}\n")
        yaml.safe_dump(cfg, f)
    rc = tune_main(["run", recipe, "--config", str(path), *extra])
    assert rc in (0, None)
    return cfg["output_dir"] if "output_dir" in cfg else None


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(out):
    return [r["loss"] for r in _metrics(out) if "loss" in r]


def _load(path, **kw):
    from tinytune.checkpoint import load_hf_model

    return load_hf_model(path, **kw)[0]


def _ordered_batches(assets, n_batches, batch_size):
    """The dataset's first items in order, padded with the library collate (shuffle=False)."""
    from tinytune.datasets import chat_dataset, padded_collate
    from tinytune.tokenizers import load_tokenizer

    tok = load_tokenizer(assets["ckpt"])
    ds = chat_dataset(tok, assets["chat"], template="chatml", max_seq_len=64, num_workers=1)
    items = [ds[i] for i in range(len(ds))]
    return [
        padded_collate(items[i * batch_size : (i + 1) * batch_size], pad_id=tok.pad_id) for i in range(n_batches)
    ], ds


# ---- full fine-tuning ---------------------------------------------------------------------------


def test_full_finetune_matches_plain_pytorch_loop(assets, tmp_path):
    out = _run("full_finetune", _sft_cfg(assets, tmp_path / "full"), tmp_path)
    got = _losses(out)
    assert len(got) == 3
    # Reference: plain logits + F.cross_entropy + torch AdamW on the same model and batches.
    model = _load(assets["ckpt"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    batches, _ = _ordered_batches(assets, 3, 4)
    want = []
    for b in batches:
        logits = model(b["tokens"])  # [b, s, V]
        loss = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        want.append(float(loss.detach()))
    assert got == pytest.approx(want, abs=2e-5)
    # the exported HF checkpoint holds the trained weights
    trained = _load(os.path.join(out, "hf_model"))
    for (n, p), (_, q) in zip(model.named_parameters(), trained.named_parameters()):
        torch.testing.assert_close(q, p, atol=2e-5, rtol=1e-4, msg=n)
    assert os.path.isfile(os.path.join(out, "loss.png"))


def test_full_finetune_weight_decay_skips_norms_biases_embeddings(assets, tmp_path):
    cfg = _sft_cfg(assets, tmp_path / "wd", max_steps=2, optimizer={"name": "adamw", "lr": 1e-2, "weight_decay": 0.5})
    out = _run("full_finetune", cfg, tmp_path)
    model = _load(assets["ckpt"])
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "norm" in n or "tok_embeddings" in n)]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias") or "norm" in n or "tok_embeddings" in n]
    assert decay and rest
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.5}, {"params": rest, "weight_decay": 0.0}], lr=1e-2)
    for b in _ordered_batches(assets, 2, 4)[0]:
        F.cross_entropy(model(b["tokens"]).flatten(0, 1), b["labels"].flatten(), ignore_index=-100).backward()
        opt.step()
        opt.zero_grad()
    trained = _load(os.path.join(out, "hf_model"))
    for (n, p), (_, q) in zip(model.named_parameters(), trained.named_parameters()):
        torch.testing.assert_close(q, p, atol=5e-5, rtol=1e-4, msg=n)


def test_torchtune_style_component_optimizer_and_scheduler(assets, tmp_path):
    """`optimizer._component_` / `lr_scheduler._component_` blocks train like `name:` ones."""
    a = _run("full_finetune", _sft_cfg(assets, tmp_path / "named", max_steps=2), tmp_path)
    b = _run(
        "full_finetune",
        _sft_cfg(
            assets,
            tmp_path / "component",
            max_steps=2,
            optimizer={"_component_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.0},
            lr_scheduler={"_component_": "torch.optim.lr_scheduler.ConstantLR", "factor": 1.0},
        ),
        tmp_path,
    )
    assert _losses(b) == pytest.approx(_losses(a), abs=1e-5)


def test_grad_accumulation_4x1_equals_bs4_in_recipe(assets, tmp_path):
    a = _run("full_finetune", _sft_cfg(assets, tmp_path / "bs4", max_steps=2), tmp_path)
    b = _run(
        "full_finetune",
        _sft_cfg(assets, tmp_path / "acc4", max_steps=2, batch_size=1, gradient_accumulation_steps=4),
        tmp_path,
    )
    assert _losses(b) == pytest.approx(_losses(a), abs=1e-5)
    ma, mb = _load(os.path.join(a, "hf_model")), _load(os.path.join(b, "hf_model"))
    for (n, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=n)


# ---- LoRA ---------------------------------------------------------------------------------------

LORA = {
    "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "apply_lora_to_mlp": True,
    "lora_rank": 4,
    "lora_alpha": 8.0,
    "lora_dropout": 0.0,
}


def test_lora_finetune_outputs_merge_and_first_loss(assets, tmp_path):
    cfg = _sft_cfg(
        assets,
        tmp_path / "lora",
        model=dict(LORA),
        max_steps=4,
        validation={"split_size": 3, "every_n_steps": 2},
        sample_generation={"prompts": ["What is ice?"], "max_new_tokens": 6},
        optimizer={"name": "adamw", "lr": 1e-2},
    )
    out = _run("lora_finetune", cfg, tmp_path)
    for name in [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "hf_model/config.json",
        "hf_model/model.safetensors",
        "loss.png",
        "metrics.jsonl",
        "summary.json",
        "generations.json",
        "config.yaml",
    ]:
        assert os.path.isfile(os.path.join(out, name)), name
    rows = _metrics(out)
    assert any("val_loss" in r for r in rows) and all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert all(r["peak_mem_gib"] > 0 for r in rows if "loss" in r)

    # first loss (adapters still zero) == base model's loss on the first training batch
    from tinytune.datasets import padded_collate
    from tinytune.training.data import split_dataset

    _, ds = _ordered_batches(assets, 1, 4)
    train, _ = split_dataset(ds, val_size=3, seed=0)
    first = padded_collate([train[i] for i in range(4)], pad_id=0)
    base = _load(assets["ckpt"])
    with torch.no_grad():
        logits = base(first["tokens"])
        want = F.cross_entropy(logits.flatten(0, 1), first["labels"].flatten(), ignore_index=-100)
    assert rows[0]["loss"] == pytest.approx(float(want), abs=1e-5)

    # merged HF checkpoint == base + trained adapter (loaded from the PEFT adapter dir)
    from tinytune.checkpoint import load_hf_model, load_peft_adapter
    from tinytune.modules.peft import lora_linear_factory

    factory = lora_linear_factory(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank=4, alpha=8.0
    )
    lora_model, info = load_hf_model(assets["ckpt"], linear_factory=factory)
    load_peft_adapter(os.path.join(out, "adapter"), info, lora_model)
    merged = _load(os.path.join(out, "hf_model"))
    x = first["tokens"]
    with torch.no_grad():
        torch.testing.assert_close(merged(x), lora_model(x), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(x), base(x), atol=1e-3)  # training changed something
    gens = json.load(open(os.path.join(out, "generations.json")))
    assert gens[0]["prompt"] == "What is ice?" and "before" in gens[0] and "after" in gens[0]
    data = json.load(open(os.path.join(out, "summary.json")))["data"]  # dataset counts reach the summary
    assert data["rows"] >= data["sequences"] > 0 and set(data) >= {"dropped", "truncated", "unused_columns"}


def test_lora_memorization_loss_decreases(assets, tmp_path):
    cfg = _sft_cfg(
        assets,
        tmp_path / "mem",
        model=dict(LORA, lora_rank=8, lora_alpha=16.0),
        max_steps=30,
        optimizer={"name": "adamw", "lr": 1e-2},
        save_merged=False,
        save_adapter=False,
    )
    cfg["dataset"]["source"] = write_chat_jsonl(str(tmp_path / "four.jsonl"), n=4)
    out = _run("lora_finetune", cfg, tmp_path)
    losses = _losses(out)
    assert losses[-1] < 0.4 * losses[0] and losses[-1] < min(losses[:10]), losses


def test_lora_resume_equals_uninterrupted(assets, tmp_path):
    base = dict(
        model=dict(LORA, lora_dropout=0.1),
        max_steps=6,
        shuffle=True,
        checkpoint_every_n_steps=2,
        lr_scheduler={"name": "cosine", "warmup_steps": 1},
        clip_grad_norm=1.0,
        optimizer={"name": "adamw", "lr": 5e-3},
        save_merged=False,
    )
    full = _run("lora_finetune", _sft_cfg(assets, tmp_path / "whole", **base), tmp_path)
    part_cfg = _sft_cfg(assets, tmp_path / "parts", **base)
    _run("lora_finetune", dict(part_cfg, stop_after_steps=3), tmp_path)
    assert not os.path.exists(os.path.join(part_cfg["output_dir"], "adapter"))
    _run("lora_finetune", dict(part_cfg, resume_from_checkpoint="auto"), tmp_path)
    ref = {r["step"]: r["loss"] for r in _metrics(full) if "loss" in r}
    got = {r["step"]: r["loss"] for r in _metrics(part_cfg["output_dir"]) if "loss" in r}
    assert sorted(got) == list(range(1, 7))
    assert [got[s] for s in range(1, 7)] == [ref[s] for s in range(1, 7)]  # identical, not just close
    from safetensors.torch import load_file

    a = load_file(os.path.join(full, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(part_cfg["output_dir"], "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qlora_recipe_runs_and_starts_at_dequantized_base_loss(assets, tmp_path):
    cfg = _sft_cfg(
        assets,
        tmp_path / "qlora",
        model=dict(LORA, quantize_base=True),
        max_steps=2,
        optimizer={"name": "adamw", "lr": 1e-2},
    )
    out = _run("lora_finetune", cfg, tmp_path)
    losses = _losses(out)
    # reference: base weights passed through NF4 and back, as the QLoRA model sees them
    from tinytune.modules.peft.nf4 import dequantize, to_nf4

    base = _load(assets["ckpt"])
    with torch.no_grad():
        for name, mod in base.named_modules():
            if name.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                mod.weight.copy_(dequantize(to_nf4(mod.weight)))
    batches, _ = _ordered_batches(assets, 1, 4)
    with torch.no_grad():
        want = F.cross_entropy(base(batches[0]["tokens"]).flatten(0, 1), batches[0]["labels"].flatten())
    assert losses[0] == pytest.approx(float(want), abs=1e-5)
    assert os.path.isfile(os.path.join(out, "hf_model", "model.safetensors"))


def test_neftune_noise_in_training_only(assets, tmp_path):
    # lr 0: the weights never change, so only NEFTune can move the training loss; validation is clean
    common = dict(model=dict(LORA), max_steps=1, optimizer={"name": "adamw", "lr": 0.0}, validation={"split_size": 4})
    plain = _run("lora_finetune", _sft_cfg(assets, tmp_path / "plain", **common), tmp_path)
    noisy = _run("lora_finetune", _sft_cfg(assets, tmp_path / "noisy", neftune_noise_alpha=50.0, **common), tmp_path)
    train = [[r["loss"] for r in _metrics(o) if "loss" in r][0] for o in (plain, noisy)]
    val = [[r["val_loss"] for r in _metrics(o) if "val_loss" in r][-1] for o in (plain, noisy)]
    assert train[1] != pytest.approx(train[0], abs=1e-4)
    assert val[1] == pytest.approx(val[0], abs=1e-7)


def test_lora_early_stopping_and_save_best(assets, tmp_path):
    # min_delta so large that nothing after the first validation improves: patience 2 stops at step 3
    cfg = _sft_cfg(
        assets,
        tmp_path / "es",
        model=dict(LORA),
        max_steps=8,
        batch_size=2,
        optimizer={"name": "adamw", "lr": 5e-2},
        validation={"split_size": 4, "every_n_steps": 1},
        early_stopping={"patience": 2, "min_delta": 1e9},
        save_best=True,
    )
    out = _run("lora_finetune", cfg, tmp_path)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["step"] == 3 and summary["stopped_early"] and summary["best_step"] == 1
    # save_best without stopping: hf_model/ is the step with the lowest logged validation loss
    cfg = _sft_cfg(
        assets,
        tmp_path / "best",
        model=dict(LORA),
        max_steps=5,
        batch_size=2,
        optimizer={"name": "adamw", "lr": 2e-1},
        validation={"split_size": 4, "every_n_steps": 1},
        save_best=True,
    )
    out = _run("lora_finetune", cfg, tmp_path)
    summary = json.load(open(os.path.join(out, "summary.json")))
    vals = {r["step"]: r["val_loss"] for r in _metrics(out) if "val_loss" in r}
    best = min(vals, key=vals.get)
    assert summary["best_step"] == best and summary["best_val_loss"] == pytest.approx(vals[best])
    from tinytune.datasets import padded_collate
    from tinytune.training.data import split_dataset

    _, ds = _ordered_batches(assets, 1, 4)
    _, val = split_dataset(ds, val_size=4, seed=0)
    b = padded_collate([val[i] for i in range(4)], pad_id=0)
    with torch.no_grad():
        got = F.cross_entropy(_load(os.path.join(out, "hf_model"))(b["tokens"]).flatten(0, 1), b["labels"].flatten())
    assert float(got) == pytest.approx(vals[best], rel=1e-4)
    assert best != max(vals)  # the best step is not the last one, so the export really went back to it


def test_lora_validation_generation_metrics(assets, tmp_path):
    cfg = _sft_cfg(
        assets,
        tmp_path / "vg",
        model=dict(LORA),
        max_steps=1,
        validation={"split_size": 4, "generation": {"num_samples": 3, "max_new_tokens": 6}},
    )
    out = _run("lora_finetune", cfg, tmp_path)
    row = [r for r in _metrics(out) if "val_bleu" in r][-1]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["val_rouge_l"] == row["val_rouge_l"]
    # independent: the exported model answers the same validation questions through the chat template
    from tinytune.tokenizers import load_tokenizer
    from tinytune.training.data import split_dataset
    from tinytune.training.prompting import generate_replies, get_bound_template
    from tinytune.training.text_metrics import generation_metrics

    _, ds = _ordered_batches(assets, 1, 4)
    _, val = split_dataset(ds, val_size=4, seed=0)
    idx = [val.indices[i] for i in range(3)]
    tok = load_tokenizer(assets["ckpt"])
    preds = generate_replies(
        _load(os.path.join(out, "hf_model")),
        tok,
        get_bound_template("chatml", tok),
        [QA[i][0] for i in idx],
        max_new_tokens=6,
    )
    want = generation_metrics(preds, [QA[i][1] for i in idx])
    assert {k: row["val_" + k] for k in want} == pytest.approx(want)


# ---- DPO ----------------------------------------------------------------------------------------


def _dpo_cfg(assets, out, **over):
    cfg = _sft_cfg(assets, out, **over)
    cfg["dataset"] = {
        "_component_": "tinytune.datasets.preference_dataset",
        "source": assets["pairs"],
        "template": "chatml",
        "max_seq_len": 64,
        "num_workers": 1,
    }
    cfg.setdefault("beta", 0.1)
    return cfg


def test_dpo_lora_recipe_matches_formula(assets, tmp_path):
    cfg = _dpo_cfg(
        assets,
        tmp_path / "dpo",
        model=dict(LORA),
        max_steps=12,
        batch_size=4,
        beta=0.5,
        optimizer={"name": "adamw", "lr": 5e-3},
    )
    out = _run("dpo", cfg, tmp_path)
    rows = [r for r in _metrics(out) if "loss" in r]
    # step 1: adapters are zero, so policy == reference and the loss is exactly log(2)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert sum(r["loss"] for r in rows[-3:]) / 3 < math.log(2)  # last epoch (3 batches) below the start
    # recompute the last logged metrics' meaning: accuracy in [0, 1], margin = chosen - rejected
    assert 0.0 <= rows[-1]["rewards/accuracies"] <= 1.0
    assert rows[-1]["rewards/margins"] == pytest.approx(rows[-1]["rewards/chosen"] - rows[-1]["rewards/rejected"])
    # the direct formula on the trained (merged) policy vs the base as reference, first pair
    from tinytune.datasets import preference_dataset
    from tinytune.tokenizers import load_tokenizer

    tok = load_tokenizer(assets["ckpt"])
    ds = preference_dataset(tok, assets["pairs"], template="chatml", max_seq_len=64, num_workers=1)
    batch = ds.collate_fn([ds[0]])
    policy, ref = _load(os.path.join(out, "hf_model")), _load(assets["ckpt"])

    def logp(m):
        lp = torch.log_softmax(m(batch["tokens"]).float(), -1)
        mask = batch["labels"] != -100
        return (lp.gather(-1, batch["labels"].clamp(min=0)[..., None]).squeeze(-1) * mask).sum(-1)

    with torch.no_grad():
        pc, pr = logp(policy)
        rc, rr = logp(ref)
    want = -F.logsigmoid(0.5 * ((pc - pr) - (rc - rr)))
    from tinytune.training.losses import dpo_loss, sequence_logps

    with torch.no_grad():
        p = sequence_logps(policy, batch["tokens"], batch["labels"])
        r = sequence_logps(ref, batch["tokens"], batch["labels"])
        got, _, _ = dpo_loss(p[:1], p[1:], r[:1], r[1:], beta=0.5)
    torch.testing.assert_close(got, want.reshape(()), atol=1e-4, rtol=1e-4)


def test_dpo_full_uses_frozen_copy(assets, tmp_path):
    cfg = _dpo_cfg(assets, tmp_path / "dpo_full", max_steps=2, batch_size=2, optimizer={"name": "adamw", "lr": 1e-3})
    out = _run("dpo", cfg, tmp_path)
    rows = [r for r in _metrics(out) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # reference stayed, policy moved


def _first_pairs_logps(model, assets, n):
    """Summed label log-probs and label counts of the first ``n`` pairs (plain log-softmax)."""
    from tinytune.datasets import preference_dataset
    from tinytune.tokenizers import load_tokenizer

    tok = load_tokenizer(assets["ckpt"])
    ds = preference_dataset(tok, assets["pairs"], template="chatml", max_seq_len=64, num_workers=1)
    batch = ds.collate_fn([ds[i] for i in range(n)])
    with torch.no_grad():
        lp = torch.log_softmax(model(batch["tokens"]).double(), -1)
    mask = batch["labels"] != -100
    logps = (lp.gather(-1, batch["labels"].clamp(min=0)[..., None]).squeeze(-1) * mask).sum(-1)
    lens = mask.sum(-1)
    return logps[:n], logps[n:], lens[:n], lens[n:]


def test_dpo_reference_free_losses_first_step_and_no_reference(assets, tmp_path, capsys):
    # simpo, full fine-tuning: no frozen copy is made; the first logged loss is the SimPO formula
    cfg = _dpo_cfg(
        assets,
        tmp_path / "simpo",
        max_steps=2,
        batch_size=3,
        loss="simpo",
        beta=2.0,
        gamma=0.5,
        optimizer={"name": "adamw", "lr": 1e-3},
    )
    out = _run("dpo", cfg, tmp_path)
    assert "loss=simpo, beta=2.0, reference: none" in capsys.readouterr().out
    pc, pr, lc, lr = _first_pairs_logps(_load(assets["ckpt"]), assets, 3)
    want = -F.logsigmoid(2.0 * (pc / lc - pr / lr) - 0.5).mean()
    rows = [r for r in _metrics(out) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(float(want), rel=1e-5)
    assert rows[0]["rewards/chosen"] == pytest.approx(float((2.0 * pc / lc).mean()), rel=1e-5)
    # orpo with LoRA (fresh adapters = base model): NLL token mean over chosen + lambda * odds-ratio term
    cfg = _dpo_cfg(assets, tmp_path / "orpo", model=dict(LORA), max_steps=1, batch_size=3, loss="orpo", beta=0.2)
    out = _run("dpo", cfg, tmp_path)
    ac, ar = pc / lc, pr / lr
    log_odds = (ac - ar) - (torch.log(1 - torch.exp(ac)) - torch.log(1 - torch.exp(ar)))
    want = -pc.sum() / lc.sum() - 0.2 * F.logsigmoid(log_odds).mean()
    row = [r for r in _metrics(out) if "loss" in r][0]
    assert row["loss"] == pytest.approx(float(want), rel=1e-5)
    assert row["nll_loss"] == pytest.approx(float(-pc.sum() / lc.sum()), rel=1e-5)


def test_dpo_unknown_loss_is_a_config_error(assets, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("# recipe: dpo\n" + yaml.safe_dump(_dpo_cfg(assets, tmp_path / "bad", loss="ipo", gamma=1.0)))
    try:
        rc = tune_main(["run", "dpo", "--config", str(path)])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert "gamma: only loss=simpo uses it" in capsys.readouterr().err


# ---- generate / chat / eval ---------------------------------------------------------------------


def _infer_cfg(assets, **over):
    cfg = {
        "checkpoint_dir": assets["ckpt"],
        "device": "cpu",
        "dtype": "fp32",
        "template": "chatml",
        "max_new_tokens": 8,
        "seed": 0,
    }
    cfg.update(over)
    return cfg


def _direct_replies(assets, prompts, max_new_tokens=8):
    from tinytune.tokenizers import load_tokenizer
    from tinytune.training.prompting import generate_replies, get_bound_template

    tok = load_tokenizer(assets["ckpt"])
    return generate_replies(
        _load(assets["ckpt"]), tok, get_bound_template("chatml", tok), prompts, max_new_tokens=max_new_tokens
    )


def test_generate_recipe_prompt_and_file(assets, tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("What is ice?\n\nSay hello.\n")
    out_file = tmp_path / "gen.jsonl"
    _run(
        "generate", _infer_cfg(assets, prompt="Name a fruit.", prompt_file=str(pf), output_file=str(out_file)), tmp_path
    )
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    prompts = ["Name a fruit.", "What is ice?", "Say hello."]
    assert [r["prompt"] for r in rows] == prompts
    assert [r["reply"] for r in rows] == _direct_replies(assets, prompts)
    assert ">>> What is ice?" in capsys.readouterr().out


@pytest.mark.parametrize(
    "plan,prompts,want", [(True, 1, "on"), (False, 40, "off"), ("auto", 1, "off"), ("auto", 40, "on")]
)
def test_generate_recipe_decode_plan_setting(assets, tmp_path, capsys, plan, prompts, want):
    """decode_plan: true / false / auto (prompts x max_new_tokens >= 256); the replies are the same."""
    from tinytune.modules import decode_plan

    steps = []
    original = decode_plan.DecodePlan.step
    monkey = pytest.MonkeyPatch()
    monkey.setattr(decode_plan.DecodePlan, "step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    try:
        asked = [f"Count to {i}." for i in range(prompts)]
        out_file = tmp_path / "gen.jsonl"
        _run("generate", _infer_cfg(assets, prompts=asked, decode_plan=plan, output_file=str(out_file)), tmp_path)
    finally:
        monkey.undo()
    assert f"decode plan: {want} (decode_plan: {plan})" in capsys.readouterr().out
    assert bool(steps) == (want == "on")  # the plan's decode step ran, or never
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["reply"] for r in rows] == _direct_replies(assets, asked)


def test_generate_recipe_without_prompts_is_a_clear_error(assets, tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text("# recipe: generate\n" + yaml.safe_dump(_infer_cfg(assets)))
    try:
        rc = tune_main(["run", "generate", "--config", str(path)])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert "no prompts" in capsys.readouterr().err


@pytest.mark.parametrize(
    "plan,max_new,want", [(False, 8, "off"), ("auto", 8, "off"), (True, 8, "on"), ("auto", 256, "on")]
)
def test_chat_recipe_piped_stdin(assets, tmp_path, capsys, monkeypatch, plan, max_new, want):
    """The same replies with and without the decode plan (decode_plan: auto = max_new_tokens >= 256)."""
    from tinytune.modules import decode_plan

    steps = []
    original = decode_plan.DecodePlan.step
    monkeypatch.setattr(
        decode_plan.DecodePlan, "step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k)
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is ice?\n/reset\nSay hello.\n/exit\nnever read\n"))
    cfg = _infer_cfg(assets, decode_plan=plan)
    if max_new != 8:
        cfg.update(max_new_tokens=max_new, max_seq_len=max_new + 64)
    _run("chat", cfg, tmp_path)
    text = capsys.readouterr().out
    assert f"decode plan: {want} (decode_plan: {plan})" in text
    assert bool(steps) == (want == "on")
    replies = _direct_replies(assets, ["What is ice?", "Say hello."], max_new_tokens=max_new)
    assert "(conversation cleared)" in text
    for r in replies:
        assert r in text
    assert "never read" not in text


def test_eval_recipe_matches_plain_cross_entropy(assets, tmp_path):
    cfg = _infer_cfg(
        assets,
        output_dir=str(tmp_path / "ev"),
        batch_size=5,
        dataset={
            "_component_": "tinytune.datasets.chat_dataset",
            "source": assets["chat"],
            "template": "chatml",
            "max_seq_len": 64,
            "num_workers": 1,
        },
        validation={"split_size": 4},
    )
    del cfg["max_new_tokens"]  # eval generates nothing: the key would be refused as unread
    _run("eval", cfg, tmp_path)
    res = json.load(open(tmp_path / "ev" / "eval.json"))
    from tinytune.datasets import padded_collate
    from tinytune.training.data import split_dataset

    _, ds = _ordered_batches(assets, 1, 4)
    _, val = split_dataset(ds, val_size=4, seed=0)
    b = padded_collate([val[i] for i in range(4)], pad_id=0)
    with torch.no_grad():
        want = F.cross_entropy(_load(assets["ckpt"])(b["tokens"]).flatten(0, 1), b["labels"].flatten())
    assert res["loss"] == pytest.approx(float(want), abs=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(float(want)), rel=1e-4)
    assert res["samples"] == 4 and len(QA) == 12


def test_eval_recipe_generation_metrics(assets, tmp_path):
    cfg = _infer_cfg(
        assets,
        output_dir=str(tmp_path / "evg"),
        batch_size=4,
        dataset={
            "_component_": "tinytune.datasets.chat_dataset",
            "source": assets["chat"],
            "template": "chatml",
            "max_seq_len": 64,
            "num_workers": 1,
        },
        generation={"num_samples": 3, "max_new_tokens": 8},
    )
    del cfg["max_new_tokens"]  # eval reads generation.max_new_tokens, not the top-level key
    _run("eval", cfg, tmp_path)
    gen = json.load(open(tmp_path / "evg" / "eval.json"))["generation"]
    # independent path: answers rendered from the raw questions through the chat template
    want_preds = _direct_replies(assets, [q for q, _ in QA[:3]], max_new_tokens=8)
    assert [e["prediction"] for e in gen["examples"]] == want_preds
    assert [e["reference"] for e in gen["examples"]] == [a for _, a in QA[:3]]
    refs = [a for _, a in QA[:3]]
    assert gen["exact_match"] == sum(p.strip() == r for p, r in zip(want_preds, refs)) / 3
    sacrebleu = pytest.importorskip("sacrebleu")
    assert gen["bleu"] == pytest.approx(sacrebleu.corpus_bleu(want_preds, [refs]).score, abs=1e-9)
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    want_rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(want_preds, refs)) / 3
    assert gen["rouge_l"] == pytest.approx(want_rouge, abs=1e-12)


# ---- shipped configs ----------------------------------------------------------------------------

SINGLE_DEVICE = ("full_finetune", "lora_finetune", "dpo", "kto", "reward_model", "generate", "chat", "eval")


def test_shipped_configs_name_an_existing_recipe_and_valid_components():
    from tinytune.config import load_config, validate_config
    from tinytune.config.registry import list_configs, list_recipes

    recipes = list_recipes()
    mine = {n: e for n, e in list_configs().items() if e.recipe in SINGLE_DEVICE}
    assert "smollm2/135M_lora_demo" in mine and len(mine) >= 20
    for family in ("smollm2", "llama3_2", "qwen2_5", "qwen3", "llama2"):
        assert any(n.startswith(family + "/") for n in mine), family
    for name, entry in mine.items():
        assert entry.recipe in recipes, name
        problems, _ = validate_config(load_config(str(entry.path), []))
        assert not problems, (name, [str(p) for p in problems])
