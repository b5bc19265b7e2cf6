"""``malloc: auto | keep | release | default``: the host allocator policy (glibc).

The behaviour is checked where it matters, by counting page faults: a 64 MiB tensor freed and
allocated again faults its memory in again under ``default`` and ``release``, not under ``keep``;
a 4 MiB one (below glibc's dynamic threshold, which rises with freed blocks) faults in every time
under ``release`` (threshold fixed at 256 KiB), never again under ``keep``. Each case runs in a
fresh interpreter (the policy is per process).
"""

import json
import subprocess
import sys

import pytest
import torch

from tinytune.config.recipe_settings import DeviceSettings
from tinytune.kernels.linear_ce import cpu_workspace, linear_cross_entropy, release_cpu_workspace
from tinytune.training.host_malloc import apply_malloc_policy, resolve_malloc_policy

_PROBE = r"""
import json, resource, sys
import torch
from tinytune.config.recipe_settings import DeviceSettings
from tinytune.training.setup import apply_malloc_setting
result = apply_malloc_setting(DeviceSettings(malloc=sys.argv[1]))
def faults_of_one_use(mib):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(mib * 2**20 // 4)
    t.fill_(1.0)  # touch every page
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
first = faults_of_one_use(64)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
again = [faults_of_one_use(64) for _ in range(3)]
small = [faults_of_one_use(4) for _ in range(4)]  # 4 MiB: below it
print(json.dumps({"result": result, "first": first, "again": again, "small": small}))
"""


def _probe(policy: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, policy], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux")
def test_keep_reuses_freed_memory_and_release_returns_it():
    pages, small_pages = 64 * 2**20 // 4096, 4 * 2**20 // 4096
    default = _probe("default")
    assert default["result"] == "default"
    assert default["first"] > pages // 2
    assert min(default["again"]) > pages // 2, default  # unmapped on free, faulted in on every use
    release = _probe("release")
    assert release["result"] == "release"
    assert min(release["again"]) > pages // 2, release
    assert min(release["small"]) > small_pages // 2, release  # fixed threshold: returned every time
    keep = _probe("keep")
    assert keep["result"] == "keep"
    assert keep["first"] > pages // 2  # the first use still has to touch the memory
    # later uses reuse touched memory: at most one more fault-in of the block over three reuses (glibc
    # may place one reuse beside the freed block before the two merge), none in the last one
    assert sum(keep["again"]) < pages * 1.05 and keep["again"][-1] < pages // 20, keep
    assert max(keep["small"]) < small_pages // 20, keep


def test_auto_is_release_for_memory_saving_runs_and_keep_otherwise():
    assert resolve_malloc_policy("auto", memory_saving=True) == "release"
    assert resolve_malloc_policy("auto", memory_saving=False) == "keep"
    for p in ("keep", "release", "default"):
        assert resolve_malloc_policy(p, memory_saving=True) == p


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match=r"malloc: 'always' is not one of auto \| keep \| release \| default"):
        apply_malloc_policy("always")
    with pytest.raises(Exception, match=r"malloc: 'always' is not one of \['auto', 'keep', 'release', 'default'\]"):
        DeviceSettings.from_config({"malloc": "always"})


def test_ce_workspace_is_reused_and_grown_and_released():
    a = cpu_workspace("t", (4, 8), torch.float32)
    b = cpu_workspace("t", (2, 8), torch.float32)
    assert b.data_ptr() == a.data_ptr()  # same storage, smaller view
    c = cpu_workspace("t", (16, 8), torch.float32)
    assert c.shape == (16, 8) and c.is_contiguous()
    assert cpu_workspace("t", (4, 8), torch.bfloat16).dtype == torch.bfloat16  # one buffer per dtype
    from tinytune.kernels import linear_ce

    assert ("t", torch.float32) in linear_ce._CPU_WORKSPACE
    release_cpu_workspace()
    assert not linear_ce._CPU_WORKSPACE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_ce_twice_with_kept_buffers_matches_a_fresh_run(dtype):
    """Two calls in a row (the second reuses the first one's scratch buffers) give the same loss and
    gradients as a call after the buffers were released, including a larger second call."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(97, 16, generator=g) * 0.3).to(dtype).requires_grad_()
    results = []
    for release in (False, True):
        out = []
        for n in (24, 40):  # the second call needs larger buffers than the first
            if release:
                release_cpu_workspace()
            h = torch.randn(n, 16, generator=torch.Generator().manual_seed(n)).to(dtype).requires_grad_()
            labels = torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n + 1))
            labels[::5] = -100
            w.grad = None
            loss = linear_cross_entropy(h, w, labels, chunk_size=7)
            loss.backward()
            out.append((loss.detach(), h.grad.clone(), w.grad.clone()))
        results.append(out)
    for kept, fresh in zip(results[0], results[1]):
        for x, y in zip(kept, fresh):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
