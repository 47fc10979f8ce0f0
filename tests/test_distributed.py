"""Data-parallel training on torch.distributed: 2 CPU processes with gloo.

Every rank trains on its half of each batch; after several steps the parameters must be identical
on both ranks and equal (to float tolerance) to one process training on the whole batch, for
mean, min-norm, central + tension and PCGrad (shared seed), through ``distribute()`` and through
DistributedDataParallel with ``no_sync()`` (both capture paths: ``opt.backward`` and the legacy
``opt.task(t)`` loop).  Processes are forked (no re-import of torch) and meet through a FileStore
in a temporary directory (no TCP port to pick); collectives time out after 60 s instead of
hanging the test run.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.aggregators import get
from torch_mtlgrad.distributed import JacobianAllReduce, distribute, task_specific_parameters

from ._helpers import Net, T, data

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()) or sys.platform == "win32",
    reason="needs torch.distributed with gloo and fork",
)

WORLD = 2
STEPS = 8
BATCH = 16  # global batch; each rank gets BATCH // WORLD rows
AGGREGATORS = ["mean", "mgda", "central+tension", "pcgrad"]


def batch(step: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return data(step, rows=BATCH, seed_offset=1000, shift=2.0)


def aggregator(name: str):
    if name == "pcgrad":
        return get("pcgrad", seed=7)  # the shared seed: same projection orders on every rank
    if name.endswith("+tension"):
        return get(name, window=3)  # tension active from step 4 on
    return get(name)


def build(name: str, seed: int = 0, **kw: Any) -> tuple[Net, MultiTaskOptimizer]:
    torch.manual_seed(seed)
    model = Net()
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                             shared=model.encoder, aggregator=aggregator(name), **kw)
    return model, opt


def losses_of(outs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[torch.Tensor]:
    return [nn.functional.mse_loss(o, y) for o, y in zip(outs, ys)]


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference(name: str) -> torch.Tensor:
    """One process, the whole batch."""
    model, opt = build(name)
    for step in range(STEPS):
        x, ys = batch(step)
        opt.zero_grad()
        opt.backward(losses_of(model(x), ys))
        opt.step()
    return flat(model)


def backward(opt: MultiTaskOptimizer, losses: list[torch.Tensor], legacy: bool) -> None:
    """Capture the task gradients: ``opt.backward`` or the legacy ``opt.task(t)`` loop."""
    if legacy:
        for t, loss in enumerate(losses):
            with opt.task(t, loss=loss):
                loss.backward(retain_graph=t < T - 1)
    else:
        opt.backward(losses)


# -- the workers (run in forked processes) -------------------------------------------------------
def _train_distributed(rank: int, name: str, legacy: bool = False) -> torch.Tensor:
    model, opt = build(name, seed=rank)  # different seeds: broadcast must make them equal
    distribute(opt)
    lo, hi = rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD
    for step in range(STEPS):
        x, ys = batch(step)
        opt.zero_grad()
        losses = losses_of(model(x[lo:hi]), [y[lo:hi] for y in ys])
        backward(opt, losses, legacy)
        opt.step()
    return flat(model)


def _train_ddp(rank: int, name: str, legacy: bool) -> torch.Tensor:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(rank)  # DDP broadcasts rank 0's parameters at construction
    ddp = DDP(Net())
    opt = MultiTaskOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9),
                             shared=ddp.module.encoder, aggregator=aggregator(name),
                             num_tasks=T if legacy else None)
    distribute(opt, broadcast=False)
    lo, hi = rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD
    for step in range(STEPS):
        x, ys = batch(step)
        opt.zero_grad()
        with ddp.no_sync():  # per-task backward passes: DDP's own reducer stays out of it
            losses = losses_of(ddp(x[lo:hi]), [y[lo:hi] for y in ys])
            backward(opt, losses, legacy)
        opt.step()
    return flat(ddp.module)


def _count_collectives(rank: int) -> list[int]:
    """all_reduce calls per step of one distributed step."""
    calls = [0]
    real = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    model, opt = build("mgda", seed=0)
    distribute(opt)
    dist.all_reduce = counting  # type: ignore[assignment]
    per_step = []
    try:
        for step in range(3):
            calls[0] = 0
            x, ys = batch(step)
            opt.zero_grad()
            lo, hi = rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD
            opt.backward(losses_of(model(x[lo:hi]), [y[lo:hi] for y in ys]))
            opt.step()
            per_step.append(calls[0])
    finally:
        dist.all_reduce = real  # type: ignore[assignment]
    return per_step


def _nonfinite_on_one_rank(rank: int) -> dict[str, Any]:
    """Rank 1 alone produces a NaN gradient at step 2; with skip both ranks must skip it."""
    model, opt = build("central+tension", nonfinite="skip")
    distribute(opt)
    for step in range(4):
        x, ys = batch(step)
        opt.zero_grad()
        z = model.encoder(x[:8])
        losses = losses_of([h(z) for h in model.heads], [y[:8] for y in ys])
        if step == 2 and rank == 1:
            losses[1] = losses[1] + (z[:, :1] * 0).abs().sqrt().sum()  # finite loss, NaN gradient
        opt.backward(losses)
        opt.step()
    return {"params": flat(model), "skipped": opt.skipped_steps}


def _worker(rank: int, world: int, store_path: str, out_dir: str, jobs: list[tuple]) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results: dict[str, Any] = {}
    try:
        for key, fn, args in jobs:
            try:
                results[key] = (fn if callable(fn) else globals()[fn])(rank, *args)
            except Exception:  # noqa: BLE001  (reported by the parent, with the traceback)
                results[key] = "ERROR\n" + traceback.format_exc()
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def run_workers(tmp_path, jobs: list[tuple]) -> list[dict[str, Any]]:
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(_worker, args=(WORLD, str(tmp_path / "store"), str(out), jobs),
                       nprocs=WORLD, start_method="fork", join=True)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        for key, value in res.items():
            if isinstance(value, str) and value.startswith("ERROR"):
                pytest.fail(f"rank {r}, job {key}:\n{value}")
    return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> list[dict[str, Any]]:
    """All the 2-rank runs of this module in one pair of forked processes."""
    import torch._dynamo  # noqa: F401  (DDP imports it; import it once, before forking)

    jobs: list[tuple] = [(f"pg/{n}", "_train_distributed", (n,)) for n in AGGREGATORS]
    jobs.append(("pg-legacy/central+tension", "_train_distributed", ("central+tension", True)))
    jobs += [(f"ddp/{n}", "_train_ddp", (n, False)) for n in ("mgda", "pcgrad")]
    jobs.append(("ddp-legacy/central+tension", "_train_ddp", ("central+tension", True)))
    jobs.append(("collectives", "_count_collectives", ()))
    jobs.append(("nonfinite", "_nonfinite_on_one_rank", ()))
    return run_workers(tmp_path_factory.mktemp("dist"), jobs)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_ranks_identical_and_equal_to_whole_batch(trained, name: str) -> None:
    r0, r1 = (res[f"pg/{name}"] for res in trained)
    assert torch.equal(r0, r1), "replicas drifted apart"
    ref = reference(name)
    assert not torch.equal(ref, flat(build(name)[0])), "training did nothing"
    torch.testing.assert_close(r0, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", ["ddp/mgda", "ddp/pcgrad", "ddp-legacy/central+tension",
                                 "pg-legacy/central+tension"])
def test_ddp_no_sync_and_legacy_loops(trained, key: str) -> None:
    r0, r1 = (res[key] for res in trained)
    assert torch.equal(r0, r1)
    torch.testing.assert_close(r0, reference(key.split("/")[1]), rtol=1e-5, atol=1e-6)


def test_collectives_per_step(trained) -> None:
    per_step = trained[0]["collectives"]
    # One bucket for J, the losses and the task-specific gradients: the optimizer hands them all
    # to synchronize() (transform's collective and the heads' pre-hook then reduce nothing).
    assert per_step == [1, 1, 1]


def test_nonfinite_on_one_rank_skips_on_all(trained) -> None:
    a, b = (res["nonfinite"] for res in trained)
    assert a["skipped"] == b["skipped"] == 1
    assert torch.equal(a["params"], b["params"])


# -- single-process checks (world size 1) ------------------------------------------------------
@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "s"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_world_of_one_changes_nothing(world_of_one) -> None:
    m1, o1 = build("central+tension")
    m2, o2 = build("central+tension")
    plugin = distribute(o2)
    assert o2.plugins[0] is plugin and plugin.world_size == 1
    for opt, model in ((o1, m1), (o2, m2)):
        for step in range(5):
            x, ys = batch(step)
            opt.zero_grad()
            opt.backward(losses_of(model(x), ys))
            opt.step()
    assert torch.equal(flat(m1), flat(m2))
    with pytest.raises(ValueError, match="already distributed"):
        distribute(o2)
    with pytest.raises(TypeError, match="MultiTaskOptimizer"):
        distribute(torch.optim.SGD(m1.parameters(), lr=0.1))
    # The plugin's (empty) state round-trips through the optimizer's state_dict.
    o2.load_state_dict(o2.state_dict())
    with pytest.raises(ValueError, match="keeps no state"):
        plugin.load_state_dict({"x": 1})


def test_task_specific_parameters_lists_heads_and_plugin_tensors(world_of_one) -> None:
    model, opt = build("mean")
    extra = nn.Parameter(torch.zeros(2))

    class P:
        def transform(self, J, losses):
            return J

        def parameters(self):
            return [extra]

    opt.plugins.append(P())
    got = task_specific_parameters(opt)
    assert [id(p) for p in got] == [id(p) for p in model.heads.parameters()] + [id(extra)]


def test_sharded_parameters_are_refused(world_of_one) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    w = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
    head = nn.Linear(4, 1)
    opt = MultiTaskOptimizer(torch.optim.SGD([w, *head.parameters()], lr=0.1), shared=[w])
    with pytest.raises(NotImplementedError, match="parameter 0 of the optimizer is sharded"):
        distribute(opt)
    assert not any(isinstance(p, JacobianAllReduce) for p in opt.plugins)


def test_representation_capture_is_refused(world_of_one) -> None:
    _, opt = build("mgda", capture="representation")
    with pytest.raises(ValueError, match="representation"):
        distribute(opt)


def test_not_initialised_is_a_clear_error() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        JacobianAllReduce()
