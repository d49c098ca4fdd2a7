"""Data-parallel training with FSDP2, applied from outside the model (nothing in model/ imports torch.distributed).

    torchrun --nproc_per_node=8 train.py configs/pretrain_slimpajama.py          # one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py CONFIG

What happens, in train.py's order:
1. `init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), starts the process group (nccl
   on CUDA, gloo on CPU) with a timeout, so a collective whose peer died fails instead of waiting forever, and
   builds a 1-D device mesh. Without torchrun (or with one process) nothing is started and training is plain
   single-process, unless parallel.fsdp_single asks for FSDP2 at world size 1.
2. `parallelize` wraps the model, still on the meta device: activation checkpointing on every block (full) or
   every k-th block (selective), then `fully_shard` on every transformer block and then on the root (the
   embedding, final norm and output head form the root's group), with a MixedPrecisionPolicy: parameters
   all-gathered in param_dtype for compute, gradients reduce-scattered in reduce_dtype (fp32 by default). Every
   parameter becomes a DTensor sharded on dim 0; each rank stores 1 / world_size of it.
3. The caller then materialises the shards with `to_empty()` and fills them by `init_weights()` or from a
   checkpoint: Hugging Face safetensors are read one tensor at a time and each rank keeps its rows
   (`copy_into_shard`); our distributed checkpoints load through torch.distributed.checkpoint (see
   training/checkpoint.py). No rank ever holds the whole model.

The gradient of the step's loss is a sum over ranks, not a mean: each rank's objective is already divided by
the global number of learnable tokens, so the reduce-scatter sums (gradient divide factor 1).
"""

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.utils.checkpoint import checkpoint

from model.weights import DTYPES  # noqa: F401  (parallel.DTYPES[reduce_dtype] in train.py)


@dataclass
class Dist:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None  # set when the model is sharded

    @property
    def main(self) -> bool:
        """The rank that logs, prints and writes the files every rank shares."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mesh is not None


def init_distributed(device: torch.device, fsdp_single: bool, timeout_s: float) -> Dist:
    """Start the process group from torchrun's environment (see the module docstring); `device` is the device
    train.py picked, which on CUDA becomes this process's GPU, cuda:LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not fsdp_single:
        return Dist(device=device)
    if world_size == 1 and "MASTER_ADDR" not in os.environ:  # FSDP2 at world size 1 without torchrun
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT") or _free_port(),
                          RANK="0", LOCAL_RANK="0")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return Dist(rank, world_size, local_rank, device, init_device_mesh(device.type, (world_size,)))


def _free_port() -> str:
    """A TCP port nothing listens on now, for a one-process group started without torchrun."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def shutdown(d: Dist, clean: bool = True) -> None:
    """End the process group. clean=True (the run finished on every rank): first make sure no rank tears down its
    connections while another still uses them. A gloo rank whose peer closes a connection under a collective that
    it has not finished (the last message of a barrier is still unread when the faster rank exits) gets an
    exception in gloo's I/O thread, which nothing catches: the process aborts (SIGABRT) after a run that succeeded.
    So every rank finishes all its collectives (a barrier), then announces it through the rendezvous store, and
    none destroys the group before every rank has announced. clean=False (an error on this rank): tear down at once;
    the peers fail on their own, as torchrun stops them."""
    if not dist.is_initialized():
        return
    if clean and dist.get_world_size() > 1:
        dist.barrier()
        store, rank, world = dist.distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size()
        store.set(f"nanoforge/finished/{rank}", "1")
        store.wait([f"nanoforge/finished/{r}" for r in range(world)])
    dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.sharded:
        dist.barrier()


def all_reduce_sum(d: Dist, value: Tensor) -> Tensor:
    """The sum over ranks of a tensor (itself when single-process)."""
    if d.sharded:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


# ----------------------------------------------------------------------------- wrapping the model


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int) -> int:
    """Recompute the activations of blocks in the backward pass instead of keeping them: "full" = every block,
    "selective" = every `every`-th block (blocks 0, k, 2k, ...), "none". Returns how many blocks were wrapped.

    The block's forward is replaced on the instance, so parameter names (and checkpoints) do not change."""
    if mode == "none":
        return 0
    wrapped = 0
    for i, block in enumerate(model.layers):
        if mode == "full" or i % every == 0:
            forward = block.forward

            def checkpointed(*args, _forward=forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            block.forward = checkpointed
            wrapped += 1
    return wrapped


def parallelize(model: nn.Module, d: Dist, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
                reshard_after_forward: bool) -> nn.Module:
    """fully_shard every block, then the root (see the module docstring). The model must still be on meta."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.layers:
        fully_shard(block, mesh=d.mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # the root's group (embedding, norm, head) is needed right after the last block: keep it gathered. Its inputs
    # (a model.batch.Batch) are not cast: per-token loss weights stay fp32 (the blocks still cast their inputs)
    root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    fully_shard(model, mesh=d.mesh, mp_policy=root_policy, reshard_after_forward=False)
    for group in (*model.layers, model):
        # sum the ranks' gradients, each objective being already a share of the global mean; a plain SUM, as
        # gloo has no pre-multiplied sum
        group.set_gradient_divide_factor(1.0)
        if hasattr(group, "set_force_sum_reduction_for_comms"):  # torch >= 2.9; older ones divide by 1 anyway
            group.set_force_sum_reduction_for_comms(True)
    return model


def set_gradient_sync(model: nn.Module, d: Dist, sync: bool) -> None:
    """Gradient accumulation: reduce-scatter only after the step's last micro-batch."""
    if d.sharded:
        model.set_requires_gradient_sync(sync)


def clip_grad_norm(params: list[Tensor], max_norm: float) -> float:
    """clip_grad_norm_ over (possibly sharded) gradients; the total norm of the whole model as a float."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.item()


# ----------------------------------------------------------------------------- tensors in and out of shards


def copy_into_shard(dst: Tensor, src: Tensor) -> None:
    """Copy a full (unsharded) tensor into a parameter: for a DTensor, only this rank's slice of it."""
    if not isinstance(dst, DTensor):
        dst.copy_(src)
        return
    local = dst.to_local()
    shape, offset = compute_local_shape_and_global_offset(dst.shape, dst.device_mesh, dst.placements)
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    local.copy_(src[index])


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a (possibly sharded) parameter. For a DTensor this is a collective: every rank must
    call it, in the same order."""
    return t.full_tensor() if isinstance(t, DTensor) else t
