"""Parallelize a GPT for a World: expert parallelism first, then DDP or FSDP2 over the rest.

    ddp   DistributedDataParallel over every parameter but the sharded experts; buffers are not
          broadcast (they are identical by construction, and the routers' step counters are per rank).
          find_unused_parameters=True keeps DDP's initial gradient buckets: DDP otherwise rebuilds them
          after the first step, and with more than 2 ranks an all-reduce's summation order depends on
          where a gradient sits in its bucket, so a resumed run (whose first step uses the initial
          buckets) would differ from the uninterrupted one in the last bits. It also admits experts
          that got no rows under the `loop` implementation.
    fsdp  FSDP2: `fully_shard` on every block, then on the root (embedding, final norm, budget), with a
          MixedPrecisionPolicy (bf16 parameters under train.precision=bf16, fp32 gradient reduction).
Sharded experts (parallel.expert > 1) are kept out of both and reduced by `reduce_expert_grads`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from softmoe.parallel.compat import ddp_without_buffer_sync
from softmoe.parallel.expert import expert_parallel
from softmoe.parallel.world import World
from softmoe.train.config import ParallelConfig

__all__ = ["parallelize", "mixed_precision_policy"]


def mixed_precision_policy(precision: str):
    """FSDP2's policy: parameters all-gathered in bf16 under bf16, gradients always reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                reduce_dtype=torch.float32)


def parallelize(model: nn.Module, world: World, config: ParallelConfig, precision: str = "fp32"
                ) -> tuple[nn.Module, list[str]]:
    """Shard the experts over the EP group and wrap the rest for data parallelism (in place for FSDP2).

    Returns:
        (the module to call forward on, names of the expert-parallel parameters).
    """
    expert_names = expert_parallel(model, world) if world.ep_size > 1 else []
    if config.data == "ddp":
        if expert_names:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_names)
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True,
                                       **ddp_without_buffer_sync()), expert_names
    if config.data == "fsdp":
        from torch.distributed.fsdp import fully_shard

        params = dict(model.named_parameters())
        ignored = {params[name] for name in expert_names}
        policy = mixed_precision_policy(precision)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy, ignored_params=ignored or None)
        fully_shard(model, mp_policy=policy, ignored_params=ignored or None)
        return model, expert_names
    raise ValueError(f"parallel.data={config.data!r}: nothing to parallelize")
