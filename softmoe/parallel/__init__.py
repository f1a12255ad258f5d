"""Training on many processes through torch.distributed, launched by torchrun.

    world.py       World: rank, world size, device, backend and the process groups (data, expert)
    data.py        ShardedData: each rank's disjoint rows of every global batch
    stats.py       global statistics: count sums (routing.losses.global_counts), metric means
    expert.py      expert parallelism over the ragged routing: counts exchange, uneven all-to-all, local experts
    wrap.py        parallelize a GPT: DDP or FSDP2 fully_shard, expert-parallel MoE layers
    checkpoint.py  torch.distributed.checkpoint (sharded, atomic) and conversion to the single-file checkpoint
    trainer.py     the Trainer's parallelize and reduce functions for a rank, and DistributedTrainer (sharded
                   checkpoints, rank 0 owns the run directory)

A single-process run imports none of this. Enable it with the `parallel` config section
(`parallel.data=ddp|fsdp`, `parallel.expert=N`) under `torchrun`; see docs/training.md.
Nothing is imported here; import the submodules directly.
"""
