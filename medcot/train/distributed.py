"""Several processes: PyTorch DDP or FSDP2 under any launcher that sets the torch.distributed variables.

    torchrun --nproc_per_node 2 -m medcot train --config configs/r1-distill-llama-8b.yaml
    accelerate launch --num_processes 2 -m medcot train --config ... train.distributed=fsdp

The launcher decides how many processes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR); the config
decides the strategy (`train.distributed`). One optimizer step always trains on the same
`per_device_batch_size x gradient_accumulation_steps` rows whatever the process count: each process
takes its share of them and the loss is normalised over the whole step's response tokens, so the
learning-rate schedule, the sample order and resuming on a different number of GPUs stay exact.
Everything that writes (run folder, reports, W&B) happens on rank 0 only.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from medcot.data.prompts import Encoded
from medcot.errors import SetupError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # 'none' (one process), 'ddp' or 'fsdp'

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(strategy: str, use_cuda: bool) -> World:
    """Join the process group the launcher describes; one process without a launcher."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)  # before the group, so NCCL binds this process to its own GPU
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank=dist.get_rank(), size=size, local_rank=local_rank, strategy=strategy)


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model, world: World):
    """The module to run forward/backward through: DDP around the model, or the model sharded in place."""
    if world.strategy == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        # Buffers (rotary frequencies) are identical everywhere; syncing them each forward is waste.
        # torch 2.13 renamed the switch; 2.11 (and older) only know broadcast_buffers.
        new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers" if new_name else "broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
    if world.strategy == "fsdp":
        _shard(model)
        return model
    return model


def _shard(peft_model) -> None:
    """FSDP2: one all-gather group per decoder layer plus the root (embeddings, norm, lm_head).

    The root is the transformers model inside PEFT's wrappers, not the PeftModel: generate() calls it
    directly, and FSDP's hooks must run for every forward. bitsandbytes 4-bit weights cannot be
    sharded (integer storage, quantization state beside the tensor), so they stay whole on each GPU,
    as accelerate does for QLoRA under FSDP2; everything else (adapters, gradients, optimizer state,
    16-bit weights) is sharded.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    root = peft_model.get_base_model()
    ignored = {p for p in root.parameters() if type(p).__name__ == "Params4bit" or not p.dtype.is_floating_point}
    dtypes = {p.dtype for p in root.parameters() if p not in ignored}
    # Frozen 16-bit base + fp32 adapters: all-gather in the compute dtype, reduce gradients in fp32.
    compute = torch.bfloat16 if torch.bfloat16 in dtypes else torch.float16 if torch.float16 in dtypes else None
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
    kw: dict[str, Any] = {"mp_policy": mp}
    if ignored:
        import inspect

        if "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise SetupError(f"QLoRA with train.distributed=fsdp needs fully_shard(ignored_params=...), which torch "
                               f"{torch.__version__} lacks; upgrade torch or use train.distributed=ddp")
        kw["ignored_params"] = ignored
    for layer in root.model.layers:
        fully_shard(layer, **kw)
    fully_shard(root, **kw)


def unwrap(engine):
    """The PeftModel behind DDP (FSDP2 shards in place, so there is nothing to unwrap)."""
    return engine.module if hasattr(engine, "require_backward_grad_sync") else engine


@contextlib.contextmanager
def accumulating(engine, world: World, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of a step (one reduction per step)."""
    if world.strategy == "ddp" and not sync:
        with engine.no_sync():
            yield
        return
    if world.strategy == "fsdp":
        engine.get_base_model().set_requires_gradient_sync(sync)
    yield


def rows_per_step(t, world: World) -> int:
    """Rows one optimizer step trains on, over all processes (train.scale_batch decides)."""
    return t.per_device_batch_size * t.gradient_accumulation_steps * (world.size if t.scale_batch else 1)


def deal_rows(rows: list[Encoded], size: int) -> list[list[Encoded]]:
    """Every rank's share of a step's rows (index = rank): equal row counts, tokens balanced.

    Rows are dealt longest first in snake order (0, 1, 1, 0, 0, 1, ...), so every rank does about
    the same work and the slowest GPU does not set the pace. Deterministic: every rank computes the
    same deal and takes its own hand; within a hand the step's order is kept.
    """
    if size == 1:
        return [rows]
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].input_ids), i))
    hands: list[list[int]] = [[] for _ in range(size)]
    for k, i in enumerate(order):
        hands[_snake(k, size)].append(i)
    return [[rows[i] for i in sorted(hand)] for hand in hands]


def _snake(k: int, n: int) -> int:
    turn, pos = divmod(k, n)
    return pos if turn % 2 == 0 else n - 1 - pos


def equal_groups(groups: list[list[Encoded]], all_counts: list[int]) -> list[list[Encoded]]:
    """Split this rank's micro-batches until every rank has as many as the rank with most.

    FSDP all-gathers weights inside every forward and backward, so all ranks must run the same
    number of them; with packing, the token budget can give ranks different counts.
    """
    target = max(all_counts)
    groups = list(groups)
    while len(groups) < target:
        i = max(range(len(groups)), key=lambda j: len(groups[j]))
        if len(groups[i]) < 2:
            raise SetupError("cannot split micro-batches evenly across processes; raise the rows per step")
        g = groups.pop(i)
        half = len(g) // 2
        groups[i:i] = [g[:half], g[half:]]
    return groups


def sum_across(x: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's value on every rank (e.g. the run folder name, which holds a timestamp)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def full_tensor(x):
    """A plain tensor from an FSDP2 DTensor result (e.g. the gradient norm); other tensors unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def trainable_state(engine) -> dict[str, torch.Tensor]:
    """Full (unsharded) trainable weights on the CPU, keyed by the PeftModel's parameter names.

    Collective under FSDP: every rank calls it; ranks other than 0 may get an empty dict.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    model = unwrap(engine)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=opts)
    # ignore_frozen_params walks named_parameters(), which names a shared tensor once: the alias of a tied
    # embedding (lm_head.weight in SmolLM2: most of a checkpoint's bytes) slipped through as if it trained.
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in state.items() if k not in frozen}


def optimizer_state(engine, optimizer) -> dict:
    """Full optimizer state keyed by parameter name, so it loads on any process count or strategy."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(unwrap(engine), optimizer, options=opts)


def load_optimizer_state(engine, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    optimizer.zero_grad(set_to_none=True)  # torch builds the empty state to load into only when no grads exist
    set_optimizer_state_dict(unwrap(engine), optimizer, state, options=StateDictOptions(full_state_dict=True))
