"""The CPU snapshot stager used by asynchronous checkpoints: a true copy, aliases kept, buffers reused."""

from __future__ import annotations

import torch

from distgpt.checkpoint.snapshot import CpuSnapshotStager, on_cpu


def test_snapshot_is_a_copy_that_keeps_aliases_and_reuses_its_shared_buffers():
    w = torch.randn(1000, requires_grad=True)
    state = {"model": {"w": w, "head": w}, "optim": {"step": torch.tensor(3.0), "lr": 0.1}, "ids": [1, 2]}
    stager = CpuSnapshotStager(shared=True)
    try:
        snap = stager.stage(state).result()
        before = w.detach().clone()
        with torch.no_grad():
            w.add_(1.0)  # training goes on: the snapshot must not see it
        assert torch.equal(snap["model"]["w"], before)
        assert snap["model"]["head"] is snap["model"]["w"]  # a tied weight stays one tensor
        assert snap["model"]["w"].is_shared() and not snap["model"]["w"].requires_grad
        assert snap["optim"] == {"step": torch.tensor(3.0), "lr": 0.1} and snap["ids"] == [1, 2]
        again = stager.stage(state).result()
        assert again["model"]["w"].data_ptr() == snap["model"]["w"].data_ptr()  # refilled, not re-allocated
        assert torch.equal(again["model"]["w"], w.detach())
        state["model"]["w"] = torch.zeros(10)  # a changed shape gets a new buffer
        assert again["model"]["w"].shape == (1000,) and stager.stage(state).result()["model"]["w"].shape == (10,)
    finally:
        stager.close()


def test_on_cpu_looks_at_every_tensor():
    assert on_cpu({"a": [torch.zeros(1), {"b": torch.ones(2)}], "c": 3})
    assert not on_cpu({"a": [torch.zeros(1, device="meta")]})
