"""The batch study's premise and its optimizers on real Horovod ranks.

1. K micro-batches on n ranks are n*K ranks with one micro-batch each, batch norm included: every
   micro-batch is normalized by its own statistics, so 2 ranks x K=2 give the parameters of 4 ranks x
   K=1 (to 1e-5) when the same clips form the same micro-batches; one batch of 4 per rank (BN over 4)
   is the control that must differ. Once with SGD and once with LARS.
2. LARS and LAMB through Horovod's DistributedOptimizer, checkpoints and the engine's optimizer-state
   broadcast: a run preempted on one rank and resumed equals the uninterrupted run, bit for bit.

Run as a script, this file is the per-rank program (``horovodrun -np N python this.py OUT MODE``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the rank processes start outside pytest
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_run import CLASSES, FRAMES, SIZE, TensorLoader, TinyNet, config, tiny_builders  # noqa: E402

MICRO, STEPS = 2, 3  # clips per micro-batch, optimizer steps


class BNNet(nn.Module):
    """Batch norm over each micro-batch: what makes accumulation differ from one larger batch."""

    def __init__(self, num_classes: int, num_frames: int, **_: Any) -> None:
        super().__init__()
        self.num_frames = num_frames
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(num_frames * 3 * SIZE * SIZE, 16), nn.BatchNorm1d(16),
                                  nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.body(clips)


class MicroBatchLoader(TensorLoader):
    """Step s uses global clips [s*G, (s+1)*G); global micro-batch j = rank*K + m gets the j-th run of
    ``batch_size`` of them, so any (ranks, K) with the same product forms the same micro-batches."""

    def __init__(self, accumulate: int, *args: Any) -> None:
        super().__init__(*args)
        self.accumulate = accumulate

    def __len__(self) -> int:
        return STEPS * self.accumulate

    def __iter__(self):
        per_step = self.batch_size * self.num_shards * self.accumulate
        for step in range(STEPS):
            for m in range(self.accumulate):
                first = step * per_step + (self.shard_id * self.accumulate + m) * self.batch_size
                rows = slice(first, first + self.batch_size)
                yield self.clips[rows], self.labels[rows]


def equivalence_main(out: Path) -> None:
    """Each optimizer: ``accum`` (K=2 on this world) and, on 2 ranks, ``control`` (one batch of 4)."""
    from tsm_dist.distributed.engine import Engine
    from tsm_dist.training.train import train

    engine = Engine(config("horovod").engine).init()
    results: dict[str, Any] = {}
    for optimizer in ("sgd", "lars"):
        for name, batch, accumulate in (("accum", MICRO, 8 // (MICRO * engine.size)), ("control", 2 * MICRO, 1)):
            if name == "control" and engine.size != 2:
                continue
            cfg = config("horovod", **{"data.batch_size": batch, "train.accumulate": accumulate, "train.epochs": 1,
                                       "data.num_samples": 8 * STEPS, "optim.name": optimizer,
                                       "optim.trust_coefficient": 0.02, "optim.base_batch": 8})
            built: list[nn.Module] = []

            def model_builder(name: str, **kwargs: Any) -> nn.Module:
                built.append(BNNet(**kwargs))
                return built[-1]

            def loader_builder(file_list: Any, root: Any, *, batch_size: int, shard_id: int, num_shards: int,
                               seed: int, train: bool, num_samples: int, k: int = accumulate, **_: Any) -> TensorLoader:
                return MicroBatchLoader(k, num_samples, batch_size, shard_id, num_shards, seed, train)

            assert train(cfg, out / f"{optimizer}_{name}_{engine.size}", model_builder=model_builder,
                         loader_builder=loader_builder) == 0
            results[f"{optimizer}_{name}"] = {k: p.detach().clone() for k, p in built[-1].named_parameters()}
    torch.save(results, out / f"equiv{engine.size}_rank{engine.rank}.pt")


def resume_main(out: Path) -> None:
    """LARS and LAMB: uninterrupted vs preempted on rank 1 in epoch 1, then resumed with ``--resume auto``."""
    from tsm_dist.distributed.engine import Engine
    from tsm_dist.training.train import train

    engine = Engine(config("horovod").engine).init()
    results: dict[str, Any] = {}
    signal_at: list[tuple[int, int] | None] = [None]
    built: list[nn.Module] = []

    model_builder, loader_builder = tiny_builders(built, signal_at)

    for optimizer, lr in (("lars", 0.2), ("lamb", 0.01)):
        full = config("horovod", **{"optim.name": optimizer, "optim.base_lr": lr, "optim.warmup_epochs": 1,
                                    "optim.weight_decay": 1e-3, "train.accumulate": 2,
                                    "train.checkpoint_every_epochs": 1, "train.keep_last": 2})
        codes = []
        for name, signal, resume in (("full", None, None), ("resumed", (1, 2), None), ("resumed", None, "auto")):
            signal_at[0] = signal
            codes.append(train(full, out / f"{optimizer}_{name}", resume=resume, model_builder=model_builder,
                               loader_builder=loader_builder))
            results[f"{optimizer}_{name}"] = {k: v.detach().clone() for k, v in built[-1].state_dict().items()}
        results[f"{optimizer}_codes"] = codes
    torch.save(results, out / f"resume_rank{engine.rank}.pt")


# ------------------------------------------------------------------------------------- pytest side
def _launch(np: int, out: Path, mode: str) -> None:
    from conftest import PYTHON, horovodrun, launcher_env, run_bounded

    result = run_bounded(horovodrun(np, PYTHON, __file__, str(out), mode), timeout=300, env=launcher_env())
    assert result.returncode == 0, result.stdout[-5000:]


pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("batch_multirank")
    _launch(2, out, "equivalence+resume")
    _launch(4, out, "equivalence")
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_accumulation_on_n_ranks_equals_n_times_k_ranks_with_batch_norm(launched, optimizer):
    two = torch.load(launched / "equiv2_rank0.pt", weights_only=False)
    four = torch.load(launched / "equiv4_rank0.pt", weights_only=False)
    accum, wide, control = two[f"{optimizer}_accum"], four[f"{optimizer}_accum"], two[f"{optimizer}_control"]
    for name in accum:
        assert torch.allclose(accum[name], wide[name], rtol=0, atol=1e-5), name
    # the check can fail: BN over 4 clips instead of 2 changes the gradients
    assert max(float((accum[n] - control[n]).abs().max()) for n in accum) > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(accum.values(), torch.load(
        launched / "equiv2_rank1.pt", weights_only=False)[f"{optimizer}_accum"].values()))


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_lars_and_lamb_resume_through_horovod_as_if_never_stopped(launched, optimizer):
    ranks = [torch.load(launched / f"resume_rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0][f"{optimizer}_codes"] == [0, 75, 0]
    full, resumed = ranks[0][f"{optimizer}_full"], ranks[0][f"{optimizer}_resumed"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert all(torch.equal(ranks[0][f"{optimizer}_resumed"][k], ranks[1][f"{optimizer}_resumed"][k]) for k in full)
    fresh = TinyNet(CLASSES, FRAMES, 0.0).state_dict()
    assert not all(torch.equal(full[k], fresh[k]) for k in full)  # it trained


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    for mode in sys.argv[2].split("+"):
        {"equivalence": equivalence_main, "resume": resume_main}[mode](out_dir)
