"""KTO: loss against the paper's formula and TRL's code, KL from mismatched pairs, ``k x bs1 == bs k``,
the unpaired dataset (masks, bad rows) and the recipe end to end on a tiny model."""

import copy
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tinytune.datasets import DatasetError, kto_collate, kto_dataset
from tinytune.models.smollm2 import smollm2_tiny
from tinytune.training.dpo import make_reference
from tinytune.training.kto_step import kto_accumulate, kto_eval, mismatched_batches
from tinytune.training.preference_losses import kto_kl, kto_losses


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _paper_kto(ratios, desirable, kl, beta, wd, wu):
    """Mean KTO loss (eq. 7): lambda_D (1 - s(beta (r - z0))) or lambda_U (1 - s(beta (z0 - r)))."""
    vals = [
        wd * (1 - _sig(beta * (r - kl))) if d else wu * (1 - _sig(beta * (kl - r))) for r, d in zip(ratios, desirable)
    ]
    return sum(vals) / len(vals)


def test_kto_losses_match_formula_and_trl():
    g = torch.Generator().manual_seed(0)
    n, beta, wd, wu = 8, 0.3, 1.0, 1.33
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    pol, ref = (
        -torch.rand(n, generator=g, dtype=torch.float64) * 20,
        -torch.rand(n, generator=g, dtype=torch.float64) * 20,
    )
    kl_pol, kl_ref = (
        -torch.rand(n, generator=g, dtype=torch.float64) * 20,
        -torch.rand(n, generator=g, dtype=torch.float64) * 20,
    )
    kl = kto_kl(kl_pol, kl_ref)
    assert float(kl) == pytest.approx(max(0.0, float((kl_pol - kl_ref).mean())))
    ratios = pol - ref
    losses = kto_losses(
        ratios[desirable], ratios[~desirable], kl, beta=beta, desirable_weight=wd, undesirable_weight=wu
    )
    want = _paper_kto(ratios.tolist(), desirable.tolist(), float(kl), beta, wd, wu)
    assert float(losses.mean()) == pytest.approx(want, rel=1e-12)
    assert float(kto_kl(kl_ref, kl_ref + 1.0)) == 0.0  # negative estimates clamp to 0

    try:
        from trl.trainer.kto_trainer import KTOTrainer
    except Exception as e:  # noqa: BLE001 - any import failure means "no TRL here"
        pytest.skip(f"trl does not import beside this torch ({type(e).__name__}: {e})")
    s = 5
    per_token = torch.zeros(n, s - 1, dtype=torch.float64)
    per_token[:, 0] = pol
    out = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(n, s - 1), mean_logits=torch.zeros(n, s - 1))
    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=acc,
        precompute_ref_logps=True,
        calculate_KL=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        _compute_kl_logps=lambda model, batch: kl_pol,
    )
    mask = torch.zeros(n, s, dtype=torch.long)
    mask[:, 2:] = 1
    inputs = {
        "label": desirable,
        "input_ids": torch.zeros(n, s, dtype=torch.long),
        "attention_mask": torch.ones(n, s),
        "completion_mask": mask,
        "ref_logps": ref,
        "ref_KL_logps": kl_ref,
    }
    trl_loss = KTOTrainer._compute_loss(fake, lambda **_: out, inputs, False)
    torch.testing.assert_close(losses.mean(), trl_loss.to(losses.dtype))
    m = {k: v[-1] for k, v in fake._metrics["train"].items()}
    assert m["kl"] == pytest.approx(float(kl))
    assert m["rewards/chosen"] == pytest.approx(float(beta * ratios[desirable].mean()))
    assert m["rewards/rejected"] == pytest.approx(float(beta * ratios[~desirable].mean()))


def _items(n, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "prompt_ids": torch.randint(0, vocab, (3 + i % 4,), generator=g).tolist(),
            "completion_ids": torch.randint(0, vocab, (2 + (i * 3) % 5,), generator=g).tolist(),
            "label": i % 3 != 1,
        }
        for i in range(n)
    ]


def _policy_and_reference(seed=0):
    torch.manual_seed(seed)
    ref = smollm2_tiny().requires_grad_(False).eval()
    policy = copy.deepcopy(ref).requires_grad_(True)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return policy, ref


def _plain_logp(model, prompt, completion):
    """Summed log-prob of ``completion`` after ``prompt`` from full logits (no library code)."""
    seq = torch.tensor([prompt + completion])
    lp = torch.log_softmax(model(seq).double(), -1)[0]
    return sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(completion))


def test_kto_accumulate_matches_plain_computation_and_kx1_equals_bs_k():
    k, beta, wd, wu = 4, 0.5, 1.5, 0.8
    items = _items(k)
    policy, ref = _policy_and_reference()
    p2 = copy.deepcopy(policy)
    full = kto_accumulate(
        policy,
        make_reference(policy, ref),
        [kto_collate(items)],
        torch.device("cpu"),
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
    )
    acc = kto_accumulate(
        p2,
        make_reference(p2, ref),
        [kto_collate([it]) for it in items],
        torch.device("cpu"),
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
    )
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert acc[key] == pytest.approx(full[key], rel=1e-5, abs=5e-6), key  # fp32 differences of ~-30 log-probs
    for (name, a), (_, b) in zip(policy.named_parameters(), p2.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=2e-6, rtol=1e-4, msg=name)
    # independent: mismatched pair i = prompt i + completion i-1 (cyclic), full-logit log-probs
    with torch.no_grad():
        policy.eval()
        kl_terms = [
            _plain_logp(policy, items[i]["prompt_ids"], items[i - 1]["completion_ids"])
            - _plain_logp(ref, items[i]["prompt_ids"], items[i - 1]["completion_ids"])
            for i in range(k)
        ]
        ratios = [
            _plain_logp(policy, it["prompt_ids"], it["completion_ids"])
            - _plain_logp(ref, it["prompt_ids"], it["completion_ids"])
            for it in items
        ]
    kl = max(0.0, sum(kl_terms) / k)
    assert full["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert full["loss"] == pytest.approx(_paper_kto(ratios, [it["label"] for it in items], kl, beta, wd, wu), rel=1e-5)
    d = [beta * r for r, it in zip(ratios, items) if it["label"]]
    assert full["rewards/chosen"] == pytest.approx(sum(d) / len(d), rel=1e-4)
    # validation: the whole set is one window
    val = kto_eval(
        policy,
        make_reference(policy, ref),
        [kto_collate(items[:2]), kto_collate(items[2:])],
        torch.device("cpu"),
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
    )
    assert val["loss"] == pytest.approx(full["loss"], rel=1e-5) and val["examples"] == k
    one = kto_eval(
        policy,
        make_reference(policy, ref),
        [kto_collate(items[:2]), kto_collate(items[2:])],
        torch.device("cpu"),
        beta=beta,
        max_batches=1,
    )
    assert one["examples"] == 2


def test_mismatched_batches_rotate_over_the_window():
    items = _items(3)
    kb = mismatched_batches([kto_collate(items[:1]), kto_collate(items[1:])])
    first = kb[0]["tokens"][0].tolist()
    want = items[0]["prompt_ids"] + items[2]["completion_ids"]
    assert first[: len(want)] == want
    with pytest.raises(ValueError, match="at least 2 examples"):
        mismatched_batches([kto_collate(items[:1])])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from _recipe_fixtures import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("kto")
    return root, make_tiny_checkpoint(str(root / "model"))


def _write_rows(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_kto_dataset_masks_match_sft_encoding_and_bad_rows(tiny, tmp_path, caplog):
    from tinytune.datasets import chat_dataset
    from tinytune.tokenizers import load_tokenizer

    _, ckpt = tiny
    tok = load_tokenizer(ckpt)
    # adversarial: the completion also occurs in the prompt and in the header word "assistant"
    rows = [
        {"prompt": "Say: assistant blue", "completion": "assistant blue", "label": True, "extra": 1},
        {"prompt": [{"role": "user", "content": "What is ice?"}], "completion": "Ice is frozen water.", "label": False},
    ]
    src = _write_rows(tmp_path / "kto.jsonl", rows)
    ds = kto_dataset(tok, src, template="chatml")
    assert "['extra']" in caplog.text
    msgs = [
        [{"role": "user", "content": "Say: assistant blue"}, {"role": "assistant", "content": "assistant blue"}],
        [{"role": "user", "content": "What is ice?"}, {"role": "assistant", "content": "Ice is frozen water."}],
    ]
    sft = chat_dataset(
        tok, [{"messages": m} for m in msgs], template="chatml", num_workers=1, cache_dir=str(tmp_path / "cache")
    )
    batch = kto_collate([ds[0], ds[1]])
    for i in range(2):
        ref = sft[i]
        n = sum(1 for t in ref["labels"] if t != -100)
        assert len(ds[i]["completion_ids"]) == n
        got_t, got_l = batch["tokens"][i].tolist(), batch["labels"][i].tolist()
        last = max(j for j, t in enumerate(ref["labels"]) if t != -100)
        assert got_t[: last + 1] == ref["tokens"][: last + 1]
        assert got_l[: last + 1] == ref["labels"][: last + 1]
        assert all(t == -100 for t in got_l[last + 1 :])
    assert batch["desirable"].tolist() == [True, False]
    bad = _write_rows(tmp_path / "bad.jsonl", rows[:1] + [{"prompt": "x", "completion": "y", "label": "yes"}])
    with pytest.raises(DatasetError, match=r"bad.jsonl: row 2: `label` must be true or false"):
        kto_dataset(tok, bad, template="chatml")
    missing = _write_rows(tmp_path / "missing.jsonl", [{"prompt": "x", "label": True}])
    with pytest.raises(DatasetError, match="missing column `completion`"):
        kto_dataset(tok, missing, template="chatml")
    assert len(kto_dataset(tok, bad, template="chatml", skip_bad_samples=True)) == 1


def test_kto_recipe_first_step_and_validation(tiny, tmp_path, monkeypatch):
    import yaml
    from _recipe_fixtures import QA

    from tinytune.cli.main import main as tune_main
    from tinytune.tokenizers import load_tokenizer

    root, ckpt = tiny
    monkeypatch.setenv("TINYTUNE_HOME", str(root / "home"))
    rows = []
    for i, (q, a) in enumerate(QA):
        rows.append({"prompt": q, "completion": a if i % 2 == 0 else QA[(i + 3) % len(QA)][1], "label": i % 2 == 0})
    src = _write_rows(tmp_path / "kto.jsonl", rows)
    node = {"_component_": "tinytune.datasets.kto_dataset", "source": src, "template": "chatml", "max_seq_len": 64}
    cfg = {
        "output_dir": str(tmp_path / "out"),
        "checkpoint_dir": ckpt,
        "device": "cpu",
        "dtype": "fp32",
        "seed": 0,
        "model": {
            "lora_attn_modules": ["q_proj", "v_proj"],
            "apply_lora_to_mlp": False,
            "lora_rank": 4,
            "lora_alpha": 8.0,
        },
        "dataset": {**node, "split": "train", "val_fraction": 0.25},
        "validation": {"dataset": {**node, "split": "validation", "val_fraction": 0.25}, "every_n_steps": 2},
        "beta": 0.2,
        "desirable_weight": 2.0,
        "undesirable_weight": 1.0,
        "batch_size": 3,
        "shuffle": False,
        "max_steps": 2,
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "metric_loggers": ["jsonl"],
        "resume_from_checkpoint": None,
    }
    path = tmp_path / "kto.yaml"
    path.write_text("# recipe: kto\n" + yaml.safe_dump(cfg))
    assert tune_main(["run", "kto", "--config", str(path)]) in (0, None)
    rows_out = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    train = [r for r in rows_out if "loss" in r]
    # step 1: fresh adapters, policy == reference: ratios 0, KL 0, loss = mean of weight x 1/2
    ds = kto_dataset(load_tokenizer(ckpt), src, template="chatml", max_seq_len=64, split="train", val_fraction=0.25)
    labels = [ds[i]["label"] for i in range(3)]
    want = sum(2.0 * 0.5 if d else 0.5 for d in labels) / 3
    assert train[0]["loss"] == pytest.approx(want, abs=1e-6) and train[0]["kl"] == 0.0
    assert train[1]["loss"] != pytest.approx(want, abs=1e-6)
    val = [r for r in rows_out if "val_loss" in r]
    assert val and "val_kl" in val[-1] and "val_rewards/chosen" in val[-1]
