"""Runs on every rank: proves Horovod really reduces, broadcasts and trains in sync.

usage: hvd_stack_worker.py [--mpi4py-comm]
Exits non-zero on any mismatch; rank 0 prints one STACK_OK line.
"""
import sys

import torch

use_comm = "--mpi4py-comm" in sys.argv
import horovod.torch as hvd  # noqa: E402

if use_comm:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD.Dup()
    hvd.init(comm=comm)
    assert hvd.size() == comm.Get_size() and hvd.rank() == comm.Get_rank(), "hvd and mpi4py disagree on ranks"
else:
    hvd.init()

rank, size = hvd.rank(), hvd.size()
assert size >= 2, f"expected several ranks, got {size}"

# 1. allreduce: sum of (rank + 1) over ranks, and the average.
x = torch.full((1000,), float(rank + 1))
total = size * (size + 1) / 2
assert torch.equal(hvd.allreduce(x, op=hvd.Sum), torch.full_like(x, total)), "allreduce sum"
assert torch.allclose(hvd.allreduce(x, op=hvd.Average), torch.full_like(x, total / size)), "allreduce average"

# 2. broadcast a model's state from rank 0: every rank starts from different weights.
torch.manual_seed(100 + rank)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
rank0_w = hvd.broadcast(model[0].weight.detach().clone(), root_rank=0)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
assert torch.equal(model[0].weight, rank0_w), "broadcast_parameters did not give rank 0's weights"


def flat_params() -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def identical_across_ranks(t: torch.Tensor) -> bool:
    gathered = hvd.allgather(t.unsqueeze(0))
    return all(torch.equal(gathered[0], gathered[i]) for i in range(size))


assert identical_across_ranks(flat_params()), "parameters differ after broadcast"

# 3. DistributedOptimizer: different data per rank, one step must apply the rank-averaged gradient.
lr = 0.1
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr),
                               named_parameters=model.named_parameters())
hvd.broadcast_optimizer_state(opt, root_rank=0)
torch.manual_seed(rank)
for step in range(4):
    inputs, target = torch.randn(32, 8), torch.randint(0, 4, (32,))
    before = flat_params()
    # The gradient this rank alone would apply, to check the step against the true average.
    local = torch.autograd.grad(torch.nn.functional.cross_entropy(model(inputs), target), list(model.parameters()))
    expected_grad = hvd.allreduce(torch.cat([g.reshape(-1) for g in local]), op=hvd.Average)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(inputs), target).backward()
    opt.step()
    assert torch.allclose(flat_params(), before - lr * expected_grad, atol=1e-6), f"step {step} != averaged SGD"
    assert identical_across_ranks(flat_params()), f"parameters differ across ranks after step {step}"

controller = "mpi" if hvd.mpi_enabled() else "gloo"
if rank == 0:
    print(f"STACK_OK controller={controller} size={size} comm={'mpi4py' if use_comm else 'world'}", flush=True)
hvd.shutdown()
