"""The training samplers: the same samples per optimizer step whatever the batch size and rank count; packing."""

import random

import pytest

from data.samplers import PackedBatchSampler, ShuffledBatchSampler, pack_first_fit


def step_sets(
    batch_size: int, accum: int, ranks: int, num_samples: int = 97, epoch: int = 1
) -> list[set[int]]:
    per_rank = []
    for rank in range(ranks):
        sampler = ShuffledBatchSampler(num_samples, batch_size, seed=3, num_replicas=ranks, rank=rank)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    steps = []
    for start in range(0, len(per_rank[0]) - accum + 1, accum):
        steps.append({i for batches in per_rank for batch in batches[start : start + accum] for i in batch})
    return steps


def test_optimizer_steps_see_the_same_samples_whatever_the_split():
    reference = step_sets(batch_size=8, accum=1, ranks=1)
    assert step_sets(batch_size=1, accum=8, ranks=1) == reference
    assert step_sets(batch_size=2, accum=2, ranks=2) == reference
    assert step_sets(batch_size=4, accum=1, ranks=2) == reference


def test_epochs_reshuffle_and_every_rank_gets_as_many_batches():
    a = list(ShuffledBatchSampler(50, 4, seed=0))
    sampler = ShuffledBatchSampler(50, 4, seed=0)
    sampler.set_epoch(1)
    assert a != list(sampler)
    counts = {len(list(ShuffledBatchSampler(50, 4, seed=0, num_replicas=3, rank=r))) for r in range(3)}
    assert counts == {4}


@pytest.mark.parametrize("seed", [0, 1])
def test_first_fit_packs_hold_every_sample_once_within_the_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(10, 4000) for _ in range(500)]
    packs = pack_first_fit(lengths, 4096, seed)
    assert sorted(i for pack in packs for i in pack) == list(range(500))
    assert all(sum(lengths[i] for i in pack) <= 4096 for pack in packs)
    assert sum(lengths) / (len(packs) * 4096) > 0.9  # two 2,100-token samples never share a padded-cost batch


def test_packed_sampler_shards_whole_packs():
    lengths = [100 + 37 * (i % 50) for i in range(300)]
    shards = [list(PackedBatchSampler(lengths, 1024, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    seen = [i for shard in shards for pack in shard for i in pack]
    assert len(seen) == len(set(seen))
