"""Several processes, one run: `torchrun ... -m cavga train` trains with DistributedDataParallel.

Each process (rank) takes its share of every global batch (`shard`), the generator and the
discriminator are each wrapped in DDP so their gradients are averaged across ranks, and BatchNorm
is synchronised (`SyncedBatchNorm2d`): the statistics of a batch are those of the global batch, as
in one process. So N processes with batches of B / N images train the same model as one process
with batches of B, up to float rounding. Only rank 0 writes files. Calibration's pass over the
training images is split across the ranks too; rank 0 merges what they fitted and calibrates on
the held-out images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cavga.engine.run import resolve_device
from cavga.errors import RunError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0

    def shard(self, indices: torch.Tensor | list[int]) -> list[int]:
        """This rank's share of a global batch (every `size`-th image from `rank`)."""
        return list(indices)[self.rank :: self.size]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        """`value` averaged over the ranks (itself alone), so that every rank takes the same decision."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.size

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is set on any rank."""
        return self.mean(float(flag), device) > 0


def setup(device: str) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPUs, one GPU per local rank),
    or run alone when there is none."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if size <= 1:
        return World(), dev
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        dev = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return world, dev


def check_batch(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        raise RunError(
            f"--batch-size {batch_size} cannot be split evenly over {world.size} processes; "
            f"choose a multiple of {world.size}"
        )


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) with its gradient: every rank's input feeds every rank's output, so the
    gradient of each input is the sum of the output gradients of all ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch across ranks (sums
    all-reduced with autograd, so gradients flow through them too). Unlike `nn.SyncBatchNorm` it runs
    on CPUs (gloo) as well as GPUs; its state dict is `nn.BatchNorm2d`'s, so checkpoints are the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        local = torch.cat([x.sum((0, 2, 3)), x.pow(2).sum((0, 2, 3)), count])
        total = _SumAcrossRanks.apply(local)
        c = x.shape[1]
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean.pow(2)).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every `nn.BatchNorm2d` replaced by a `SyncedBatchNorm2d` holding the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = SyncedBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            ).to(next(child.buffers()).device)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            sync_batchnorm(child)
    return module


def device_ids(device: torch.device) -> list[int] | None:
    """DDP's `device_ids`: the one GPU of this rank, or None on a CPU."""
    return [device.index] if device.type == "cuda" else None


def wrap(model: nn.Module, world: World, device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    """The generator (the model without its discriminator) and the discriminator, each in DDP when
    there are several ranks; the model itself and its discriminator otherwise."""
    if world.size <= 1 or not any(p.requires_grad for p in model.generator_parameters()):
        return model, model.discriminator  # alone, or a training-free anchor: nothing to average
    ids = device_ids(device)
    if model.discriminator is not None:
        ignored = [f"discriminator.{n}" for n, _ in model.discriminator.named_parameters()]
        ignored += [f"discriminator.{n}" for n, _ in model.discriminator.named_buffers()]
        # The discriminator has its own DDP; the generator's must neither own nor average it.
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    # Every generator parameter gets a gradient in every step (the discriminator is not the generator's).
    generator = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    discriminator = None
    if model.discriminator is not None:
        discriminator = nn.parallel.DistributedDataParallel(model.discriminator, device_ids=ids)
    return generator, discriminator
