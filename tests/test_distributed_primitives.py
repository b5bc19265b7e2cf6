"""Distributed helpers: mesh sizes, backend choice, resumable sampler, and (via torchrun on
gloo) FSDP / TP / HSDP / FSDP+TP training plus DCP resume against single-process training."""

import json

import pytest
import torch

from tests.dist_workers.launch import REPO, torchrun
from tinytune.checkpoint.dcp import DistributedCheckpointer
from tinytune.distributed.dist_sampler import ResumableDistributedSampler
from tinytune.distributed.mesh import ParallelDims, get_backend


def test_parallel_dims_infer_and_validate():
    assert ParallelDims.from_config(8) == ParallelDims(1, 8, 1)
    assert ParallelDims.from_config(8, tensor_parallel=2) == ParallelDims(1, 4, 2)
    assert ParallelDims.from_config(8, data_parallel_replicate=2, data_parallel_shard=2, tensor_parallel=-1).tp == 2
    assert ParallelDims.from_config(4, data_parallel_replicate=-1, data_parallel_shard=2).dp == 4
    with pytest.raises(ValueError, match="not divisible"):
        ParallelDims.from_config(6, tensor_parallel=4)
    with pytest.raises(ValueError, match="multiply to 4"):
        ParallelDims.from_config(8, data_parallel_shard=2, tensor_parallel=2)
    with pytest.raises(ValueError, match="at most one may be -1"):
        ParallelDims.from_config(8, data_parallel_shard=-1, tensor_parallel=-1)


def test_backend_by_device():
    assert get_backend("cpu") == "gloo"
    assert get_backend("cuda") == "nccl"
    assert get_backend("npu") == "hccl"
    assert get_backend("cuda", cpu_offload=True) == "cuda:nccl,cpu:gloo"
    with pytest.raises(ValueError, match="mps"):
        get_backend("mps")


def test_sampler_matches_global_batches_and_resumes():
    n, ranks, b = 23, 2, 3
    samplers = [ResumableDistributedSampler(n, ranks, r, seed=5) for r in range(ranks)]
    for s in samplers:
        s.set_epoch(1)
    per_rank = [list(s) for s in samplers]
    assert sorted(sum(per_rank, [])) == sorted(set(sum(per_rank, [])))  # disjoint
    g = torch.Generator().manual_seed(5 + 1)
    order = torch.randperm(n, generator=g).tolist()
    for t in range(len(per_rank[0]) // b):  # step t of all ranks == step t of one process with batch b*ranks
        union = sorted(sum((p[t * b : (t + 1) * b] for p in per_rank), []))
        assert union == sorted(order[t * b * ranks : (t + 1) * b * ranks])
    state = samplers[1].state_dict(samples_consumed=2 * b)
    fresh = ResumableDistributedSampler(n, ranks, 1, seed=5)
    fresh.load_state_dict(state)
    assert list(fresh) == per_rank[1][2 * b :] and len(fresh) == len(per_rank[1]) - 2 * b
    with pytest.raises(ValueError, match="same `seed`"):
        ResumableDistributedSampler(n, ranks, 1, seed=6).load_state_dict(state)
    padded = ResumableDistributedSampler(5, 2, 1, shuffle=False, drop_last=False)
    assert list(padded) == [1, 3, 0]


def test_checkpointer_ignores_incomplete(tmp_path):
    ck = DistributedCheckpointer(tmp_path)
    (tmp_path / "dcp" / "step_4").mkdir(parents=True)
    (tmp_path / "dcp" / "step_2").mkdir()
    (tmp_path / "dcp" / "step_2" / "COMPLETE").write_text("")
    assert ck.resolve("auto").name == "step_2"
    assert ck.resolve(None) is None
    with pytest.raises(ValueError, match="step_4"):  # a ConfigError: printed without traceback
        ck.resolve(str(tmp_path / "dcp" / "step_4"))


def _check(out, layout, tol=1e-5):
    res = json.loads((out / f"{layout}.json").read_text())
    assert res["keys_equal"]
    assert res["dist"] == pytest.approx(res["ref"], abs=tol), layout
    assert res["resumed"] == pytest.approx(res["ref"][-1:], abs=tol), layout
    assert res["param_diff"][0] < 1e-4 and res["resumed_param_diff"][0] < 1e-4, (layout, res)


@pytest.mark.slow  # the recipe tests cover these layouts on real models in the default suite
def test_two_rank_fsdp_tp_match_single_process(tmp_path):
    torchrun(2, [str(REPO / "tests/dist_workers/primitives_worker.py"), str(tmp_path), "fsdp", "tp", "tp_lossparallel"])
    for layout in ("fsdp", "tp", "tp_lossparallel"):
        _check(tmp_path, layout)


@pytest.mark.slow
def test_four_rank_hsdp_and_fsdp_tp_match_single_process(tmp_path):
    torchrun(4, [str(REPO / "tests/dist_workers/primitives_worker.py"), str(tmp_path), "hsdp", "fsdp_tp"])
    for layout in ("hsdp", "fsdp_tp"):
        _check(tmp_path, layout)


def test_dcp_checkpointer_roundtrip_and_pruning(tmp_path):
    """One-process group in this process: save 3 steps with keep_last=2, restore the newest exactly."""
    from tinytune.distributed.mesh import init_distributed, shutdown_distributed

    init_distributed("cpu")
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        ck = DistributedCheckpointer(tmp_path, keep_last=2)
        for step in (1, 2, 3):
            model(torch.randn(5, 4)).square().sum().backward()
            opt.step()
            opt.zero_grad()
            ck.save(step, model, opt, {"step": step})
        (tmp_path / "dcp" / ".step_4.tmp").mkdir()  # a crashed save is never picked up
        assert [p.name for p in ck.complete_checkpoints()] == ["step_2", "step_3"]
        expected_rng = torch.rand(3)  # the RNG draw right after the last save
        model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
        state = ck.load(ck.resolve("auto"), model2, opt2)
        assert state == {"step": 3}
        assert torch.equal(torch.rand(3), expected_rng)  # RNG restored to the save point
        for a, b in zip(model.parameters(), model2.parameters()):
            assert torch.equal(a, b)
        s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
        assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)
    finally:
        shutdown_distributed()
