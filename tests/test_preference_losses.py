"""Preference losses against the published formulas (written here, scalar by scalar) and TRL's code.

Also: gradient accumulation ``k x bs1 == bs k`` for every loss, and the validation pass
(:func:`dpo_eval`) against a plain log-softmax computation.
"""

import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tinytune.config import ConfigError
from tinytune.models.smollm2 import smollm2_tiny
from tinytune.training.dpo import dpo_accumulate, dpo_eval, make_reference
from tinytune.training.preference_losses import PREFERENCE_LOSSES, PreferenceLoss

B = 6
LEN_C = torch.tensor([3, 7, 1, 12, 5, 9])
LEN_R = torch.tensor([4, 2, 8, 6, 5, 11])


def _logps(seed=0):
    g = torch.Generator().manual_seed(seed)
    # summed log-probs: negative, roughly proportional to length
    pc = -(torch.rand(B, generator=g) * 1.5 + 0.2) * LEN_C
    pr = -(torch.rand(B, generator=g) * 1.5 + 0.2) * LEN_R
    rc = pc + torch.randn(B, generator=g)
    rr = pr + torch.randn(B, generator=g)
    return pc.double(), pr.double(), rc.double(), rr.double()


def _ls(x):  # log sigmoid, scalar
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _paper(kind, pc, pr, rc, rr, lc, lr, beta, eps, gamma):
    """One pair's loss from the papers' formulas (scalars)."""
    h = (pc - rc) - (pr - rr)
    if kind == "sigmoid":  # DPO eq. 7; cDPO label smoothing
        return -(1 - eps) * _ls(beta * h) - eps * _ls(-beta * h)
    if kind == "hinge":  # SLiC: max(0, 1 - beta * h)
        return max(0.0, 1 - beta * h)
    if kind == "robust":  # rDPO eq. 8
        return ((1 - eps) * -_ls(beta * h) - eps * -_ls(-beta * h)) / (1 - 2 * eps)
    if kind == "ipo":  # IPO eq. 17 on per-token log-ratios (TRL's normalisation)
        return ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2
    if kind == "simpo":  # SimPO eq. 6
        z = beta / lc * pc - beta / lr * pr - gamma
        return -(1 - eps) * _ls(z) - eps * _ls(-z)
    if kind == "orpo":  # ORPO eqs. 4, 7 (without the SFT term): -lambda * log sigmoid(log odds ratio)
        p_c, p_r = math.exp(pc / lc), math.exp(pr / lr)
        return -beta * _ls(math.log((p_c / (1 - p_c)) / (p_r / (1 - p_r))))
    raise AssertionError(kind)


PARAMS = {
    "sigmoid": dict(beta=0.3, label_smoothing=0.1),
    "hinge": dict(beta=0.4),
    "ipo": dict(beta=0.5),
    "robust": dict(beta=0.2, label_smoothing=0.2),
    "simpo": dict(beta=2.0, gamma=0.5, label_smoothing=0.05),
    "orpo": dict(beta=0.25),
}


@pytest.mark.parametrize("kind", PREFERENCE_LOSSES)
def test_pair_losses_match_paper_formulas(kind):
    p = PARAMS[kind]
    fn = PreferenceLoss(kind, **p)
    pc, pr, rc, rr = _logps()
    losses, crw, rrw = fn.pair_losses(pc, pr, rc, rr, LEN_C, LEN_R)
    want = [
        _paper(
            kind,
            float(pc[i]),
            float(pr[i]),
            float(rc[i]),
            float(rr[i]),
            int(LEN_C[i]),
            int(LEN_R[i]),
            p["beta"],
            p.get("label_smoothing", 0.0),
            p.get("gamma", 0.0),
        )
        for i in range(B)
    ]
    torch.testing.assert_close(losses, torch.tensor(want, dtype=torch.float64), atol=1e-10, rtol=1e-9)
    if fn.needs_reference:
        torch.testing.assert_close(crw, p["beta"] * (pc - rc))
        torch.testing.assert_close(rrw, p["beta"] * (pr - rr))
    else:
        torch.testing.assert_close(crw, p["beta"] * pc / LEN_C)
        torch.testing.assert_close(rrw, p["beta"] * pr / LEN_R)
    assert fn.needs_reference == (kind not in ("simpo", "orpo"))
    if not fn.needs_reference:  # reference-free losses do not look at reference log-probs
        again, _, _ = fn.pair_losses(pc, pr, None, None, LEN_C, LEN_R)
        torch.testing.assert_close(again, losses)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown preference loss"):
        PreferenceLoss("kto_pair")
    with pytest.raises(ConfigError, match="gamma: only loss=simpo"):
        PreferenceLoss("sigmoid", gamma=0.5)
    with pytest.raises(ConfigError, match="label_smoothing: not used by loss=ipo"):
        PreferenceLoss("ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match=r"\[0, 0.5\)"):
        PreferenceLoss("robust", label_smoothing=0.5)
    with pytest.raises(ConfigError, match="beta"):
        PreferenceLoss("sigmoid", beta=0.0)


# ---- TRL's implementation (test-only dependency) -------------------------------------------------


def _trl_or_skip():
    try:
        import trl  # noqa: F401
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
        from trl.trainer.dpo_trainer import DPOTrainer
    except Exception as e:  # noqa: BLE001 - any import failure means "no TRL here"
        pytest.skip(
            f"trl does not import beside this torch ({type(e).__name__}: {e}); "
            "pip install trl --no-deps to run the comparison"
        )
    return DPOTrainer, CPOTrainer, ORPOTrainer


def _fake_trainer(**kw):
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=acc,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_weights=[1.0],
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        alpha=0.0,
        **kw,
    )


def _trl_dpo(DPOTrainer, kind, beta, eps, pc, pr, rc, rr):
    """TRL's DPOTrainer._compute_loss on fixed log-probs (a stand-in model returns per-token log-probs)."""
    s = int(max(LEN_C.max(), LEN_R.max())) + 2
    lens = torch.cat([LEN_C, LEN_R])
    mask = torch.zeros(2 * B, s, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        mask[i, 1 : 1 + n] = 1  # one prompt token, then the completion
    per_token = torch.zeros(2 * B, s - 1, dtype=torch.float64)
    per_token[:, 0] = torch.cat([pc, pr])  # only the row sums matter
    out = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(2 * B, s - 1),
        mean_logits=torch.zeros(2 * B, s - 1),
        is_top1=torch.zeros(2 * B, s - 1, dtype=torch.bool),
    )
    fake = _fake_trainer(loss_types=[kind], beta=beta, label_smoothing=eps)
    inputs = {
        "input_ids": torch.zeros(2 * B, s, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, s),
        "completion_mask": mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(fake, lambda **_: out, inputs, False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "robust"])
def test_reference_losses_match_trl(kind):
    DPOTrainer, _, _ = _trl_or_skip()
    p = dict(PARAMS[kind])
    if kind == "sigmoid":  # TRL 1.x's sigmoid has no label smoothing (cDPO is checked against the formula)
        p.pop("label_smoothing")
    pc, pr, rc, rr = _logps(1)
    want, metrics = _trl_dpo(DPOTrainer, kind, p["beta"], p.get("label_smoothing", 0.0), pc, pr, rc, rr)
    losses, crw, rrw = PreferenceLoss(kind, **p).pair_losses(pc, pr, rc, rr, LEN_C, LEN_R)
    torch.testing.assert_close(losses.mean(), want.to(losses.dtype), atol=1e-10, rtol=1e-9)
    assert float(crw.mean()) == pytest.approx(metrics["rewards/chosen"], rel=1e-9)
    assert float(rrw.mean()) == pytest.approx(metrics["rewards/rejected"], rel=1e-9)
    assert float((crw - rrw).mean()) == pytest.approx(metrics["rewards/margins"], rel=1e-9)
    assert float((crw > rrw).double().mean()) == pytest.approx(metrics["rewards/accuracies"])


def test_simpo_matches_trl_cpo_simpo():
    _, CPOTrainer, _ = _trl_or_skip()
    p = PARAMS["simpo"]
    pc, pr, _, _ = _logps(2)
    fake = _fake_trainer(
        loss_type="simpo", beta=p["beta"], simpo_gamma=p["gamma"], label_smoothing=p["label_smoothing"]
    )
    # TRL's SimPO runs on average log-probs (CPOTrainer: average_log_prob for simpo)
    want, want_c, want_r = CPOTrainer.cpo_loss(fake, pc / LEN_C, pr / LEN_R)
    losses, crw, rrw = PreferenceLoss("simpo", **p).pair_losses(pc, pr, None, None, LEN_C, LEN_R)
    torch.testing.assert_close(losses, want)
    torch.testing.assert_close(crw, want_c)
    torch.testing.assert_close(rrw, want_r)


def test_orpo_matches_trl_odds_ratio_loss():
    _, _, ORPOTrainer = _trl_or_skip()
    beta = PARAMS["orpo"]["beta"]
    pc, pr, _, _ = _logps(3)
    fake = _fake_trainer(beta=beta)
    ratio, want_c, want_r, _, _ = ORPOTrainer.odds_ratio_loss(fake, pc / LEN_C, pr / LEN_R)
    losses, crw, rrw = PreferenceLoss("orpo", beta=beta).pair_losses(pc, pr, None, None, LEN_C, LEN_R)
    torch.testing.assert_close(losses.float(), -ratio, atol=1e-6, rtol=1e-6)  # TRL: loss = nll - ratio.mean()
    torch.testing.assert_close(crw.float(), want_c, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rrw.float(), want_r, atol=1e-6, rtol=1e-6)


# ---- on a model: gradient accumulation and the validation pass ----------------------------------


def _pair_batch(n, seed=0, vocab=256):
    """``n`` pairs with different prompt/answer lengths, right-padded like preference_collate."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(2 * n):
        s, prompt = 6 + (i * 5) % 9, 2 + i % 3
        tokens = torch.randint(0, vocab, (s,), generator=g)
        labels = torch.cat([tokens[1:], torch.tensor([-100])])
        labels[:prompt] = -100
        rows.append((tokens, labels))
    s = max(t.shape[0] for t, _ in rows)
    tokens = torch.zeros(2 * n, s, dtype=torch.long)
    labels = torch.full((2 * n, s), -100)
    for i, (t, lab) in enumerate(rows):
        tokens[i, : t.shape[0]], labels[i, : t.shape[0]] = t, lab
    return {"tokens": tokens, "labels": labels}


def _split_pairs(batch, n):
    """``n`` one-pair micro-batches (chosen row i, rejected row n + i), trimmed of common padding."""
    out = []
    for i in range(n):
        rows = torch.tensor([i, n + i])
        mb = {k: v[rows] for k, v in batch.items()}
        keep = int((mb["labels"] != -100).any(0).nonzero().max()) + 2
        out.append({k: v[:, :keep] for k, v in mb.items()})
    return out


def _policy_and_reference(seed=0):
    torch.manual_seed(seed)
    ref = smollm2_tiny().requires_grad_(False).eval()
    policy = copy.deepcopy(ref).requires_grad_(True)
    with torch.no_grad():  # move the policy away from the reference so every term is non-trivial
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return policy, ref


@pytest.mark.parametrize("kind", PREFERENCE_LOSSES)
def test_grad_accumulation_kx1_equals_bs_k(kind):
    k = 4
    batch = _pair_batch(k)
    fn = PreferenceLoss(kind, **PARAMS[kind])
    p1, ref = _policy_and_reference()
    p2 = copy.deepcopy(p1)
    m_full = dpo_accumulate(p1, make_reference(p1, ref), [batch], torch.device("cpu"), fn)
    m_acc = dpo_accumulate(p2, make_reference(p2, ref), _split_pairs(batch, k), torch.device("cpu"), fn)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert m_acc[key] == pytest.approx(m_full[key], rel=1e-5, abs=1e-6), key
    assert m_acc["label_tokens"] == m_full["label_tokens"]
    for (name, a), (_, b) in zip(p1.named_parameters(), p2.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=2e-6, rtol=1e-4, msg=name)


def _plain_logps(model, batch):
    """Summed label log-probs from full logits (independent of our fused cross-entropy)."""
    lp = torch.log_softmax(model(batch["tokens"]).double(), -1)
    mask = batch["labels"] != -100
    return (lp.gather(-1, batch["labels"].clamp(min=0)[..., None]).squeeze(-1) * mask).sum(-1)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "orpo"])
def test_dpo_eval_matches_plain_computation_and_max_batches(kind):
    n = 3
    batches = [_pair_batch(n, seed=s) for s in range(3)]
    params = PARAMS[kind]
    fn = PreferenceLoss(kind, **params)
    policy, ref = _policy_and_reference(1)
    policy.train()
    for max_batches in (None, 2):
        got = dpo_eval(policy, make_reference(policy, ref), batches, torch.device("cpu"), fn, max_batches=max_batches)
        assert policy.training  # restored
        used = batches[:max_batches] if max_batches else batches
        pair_losses, chosen_r, rejected_r, nll, tokens = [], [], [], 0.0, 0
        with torch.no_grad():
            for b in used:
                lp, rp = _plain_logps(policy.eval(), b), _plain_logps(ref, b)
                policy.train()
                lens = (b["labels"] != -100).sum(-1)
                for i in range(n):
                    pc, pr, rc, rr = float(lp[i]), float(lp[n + i]), float(rp[i]), float(rp[n + i])
                    lc, lr = int(lens[i]), int(lens[n + i])
                    pair_losses.append(
                        _paper(kind, pc, pr, rc, rr, lc, lr, params["beta"], params.get("label_smoothing", 0.0), 0.0)
                    )
                    if kind == "orpo":
                        chosen_r.append(params["beta"] * pc / lc)
                        rejected_r.append(params["beta"] * pr / lr)
                    else:
                        chosen_r.append(params["beta"] * (pc - rc))
                        rejected_r.append(params["beta"] * (pr - rr))
                    nll -= pc
                    tokens += lc
        want = sum(pair_losses) / len(pair_losses) + (nll / tokens if kind == "orpo" else 0.0)
        assert got["pairs"] == n * len(used)
        assert got["loss"] == pytest.approx(want, rel=1e-5)
        assert got["rewards/chosen"] == pytest.approx(sum(chosen_r) / len(chosen_r), rel=1e-5, abs=1e-6)
        assert got["rewards/rejected"] == pytest.approx(sum(rejected_r) / len(rejected_r), rel=1e-5, abs=1e-6)
        acc = sum(c > r for c, r in zip(chosen_r, rejected_r)) / len(chosen_r)
        assert got["rewards/accuracies"] == pytest.approx(acc)
