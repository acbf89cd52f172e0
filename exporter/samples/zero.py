"""ZeRO stage-1 partition geometry of DeeperSpeed's ``FP16_DeepSpeedZeroOptimizer_Stage1``.

Source: EleutherAI/DeeperSpeed eb7f5cff ``deepspeed/runtime/zero/stage1.py``:
``best_max_elems_per_comm``, ``flatten_dense_tensors_sub_partition_aligned``,
``get_data_parallel_sub_partitions``, ``get_group_alignment_padding`` and
``_get_local_group_paddings``. Per param group, the tensors are flattened in group order and
zero-padded at the end to ``num_comm_intervals * dp * sub_partition_size`` elements; the flat
buffer is cut into equal sub-partitions, sub-partition ``k`` going to rank ``k % dp`` in comm
interval ``k // dp``. The elastic checkpoint trims each sub-partition's padding, so the lean
sub-partitions concatenated in ``k`` order give back the unpadded flat group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from exporter.samples.shapes import SampleSpecError

# GPT-NeoX passes zero_optimization.reduce_bucket_size (Pythia configs: 500000000) to the
# optimizer as max_elements_per_comm (DeeperSpeed engine.py ``_configure_zero_optimizer``).
PYTHIA_MAX_ELEMENTS_PER_COMM = 500_000_000


def best_max_elements_per_comm(num_elements: int, max_elements_per_comm: int, dp: int) -> int:
    """The per-group comm size stage 1 picks to reduce padding (``best_max_elems_per_comm``)."""
    max_comm_intervals = math.ceil(num_elements / max_elements_per_comm)
    padding_for_max_comm = max_elements_per_comm * max_comm_intervals - num_elements
    min_comm_intervals = num_elements // max_elements_per_comm
    if min_comm_intervals == 0:
        return max_elements_per_comm
    padding_for_min_comm = math.ceil(num_elements / (dp * min_comm_intervals))
    if padding_for_max_comm > padding_for_min_comm:
        return padding_for_min_comm + max_elements_per_comm
    return max_elements_per_comm


@dataclass(frozen=True)
class GroupPartition:
    """How one optimizer param group of one tensor-parallel rank is split over ``dp`` ranks."""

    group: int
    names: tuple[str, ...]  # module names in flat (group) order
    numels: tuple[int, ...]
    dp: int
    max_elements_per_comm: int  # after ``best_max_elements_per_comm``
    sub_partition_size: int
    num_comm_intervals: int

    @property
    def numel(self) -> int:
        """Elements of the group without padding."""
        return sum(self.numels)

    @property
    def padded_numel(self) -> int:
        return self.num_comm_intervals * self.dp * self.sub_partition_size

    @property
    def num_sub_partitions(self) -> int:
        return self.num_comm_intervals * self.dp

    def sub_partition_index(self, rank: int, comm: int) -> int:
        """Index ``k`` of rank ``rank``'s sub-partition in comm interval ``comm``."""
        return comm * self.dp + rank

    def padding(self, k: int) -> int:
        """Padding elements at the end of sub-partition ``k`` (``get_alignment_padding``)."""
        high = (k + 1) * self.sub_partition_size
        if high <= self.numel:
            return 0
        return min(self.sub_partition_size, high - self.numel)

    def paddings(self) -> list[int]:
        """``group_paddings[group]`` of the optimizer: one entry per sub-partition ``k``."""
        return [self.padding(k) for k in range(self.num_sub_partitions)]

    def lean_range(self, rank: int, comm: int) -> tuple[int, int]:
        """[start, stop) of the saved (padding-trimmed) sub-partition in the unpadded flat group."""
        k = self.sub_partition_index(rank, comm)
        start = min(k * self.sub_partition_size, self.numel)
        return start, start + self.sub_partition_size - self.padding(k)

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Module name -> (start, numel) in the unpadded flat group."""
        result: dict[str, tuple[int, int]] = {}
        start = 0
        for name, numel in zip(self.names, self.numels, strict=True):
            result[name] = (start, numel)
            start += numel
        return result


def partition_group(
    group: int, names: list[str], numels: list[int], dp: int, max_elements_per_comm: int
) -> GroupPartition:
    """Lay out one param group the way stage 1's ``__init__`` does."""
    if dp < 1:
        raise SampleSpecError("data-parallel size must be at least 1")
    num_elements = sum(numels)
    if num_elements == 0:
        raise SampleSpecError(f"param group {group} is empty")
    max_comm = best_max_elements_per_comm(num_elements, max_elements_per_comm, dp)
    if max_comm < dp:
        raise SampleSpecError(f"max_elements_per_comm {max_comm} < dp {dp}")
    # flatten_dense_tensors_sub_partition_aligned
    aligned_param_partition_size = math.ceil(num_elements / dp)
    aligned_comm_partition_size = max_comm // dp
    if aligned_param_partition_size <= aligned_comm_partition_size:
        count, size = 1, aligned_param_partition_size
    else:
        count = math.ceil(aligned_param_partition_size / aligned_comm_partition_size)
        size = aligned_comm_partition_size
    # get_data_parallel_sub_partitions recomputes the size from min(total, max_comm); stage 1
    # asserts the two agree, so a layout where they differ never reached a checkpoint.
    total = count * size * dp
    if min(total, max_comm) // dp != size:
        raise SampleSpecError(
            f"stage 1 cannot partition {num_elements} elements with dp={dp} and "
            f"max_elements_per_comm={max_elements_per_comm}"
        )
    return GroupPartition(group, tuple(names), tuple(numels), dp, max_comm, size, count)
