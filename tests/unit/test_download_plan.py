"""How a download's to-do list is carved into requests (``_Plan.carve``), without a network.

The hasher digests the file in order, so the connections must work side by side near the front:
a plan that handed each connection a quarter of the file would leave three quarters to hash
after the last byte arrived.
"""

from __future__ import annotations

from collections.abc import Sequence

from snapfs._download import SEGMENT_CHUNKS, _Extent, _Plan

MIB = 1 << 20
CHUNK = 8 * MIB


def plan_of(size: int, held: Sequence[_Extent] = ()) -> _Plan:
    """A plan for ``size`` bytes with its ``cond`` held, as every _Plan method expects."""
    plan = _Plan(CHUNK)
    plan.cond.acquire()
    plan.set_size(size, held)
    return plan


def carve_all(plan: _Plan, connections: int) -> list[tuple[int, int]]:
    ranges = []
    while plan.todo:
        ranges.append(plan.carve(connections))
    return ranges


def test_requests_cover_the_file_in_order_without_gaps_or_overlap() -> None:
    plan = plan_of(1 << 30)
    ranges = carve_all(plan, 4)
    pos = 0
    for start, end in ranges:
        assert start == pos and end > start
        pos = end
    assert pos == 1 << 30


def test_requests_stay_near_the_front_of_a_large_file() -> None:
    plan = plan_of(1 << 30)
    ranges = carve_all(plan, 4)
    assert max(end - start for start, end in ranges) == SEGMENT_CHUNKS * CHUNK
    # The first four requests (one per connection) together reach no further than 4 segments.
    assert ranges[3][1] <= 4 * SEGMENT_CHUNKS * CHUNK


def test_requests_shrink_to_one_chunk_at_the_end() -> None:
    plan = plan_of(1 << 30)
    ranges = carve_all(plan, 4)
    assert all(end - start == CHUNK for start, end in ranges[-4:])
    assert all((end - start) % CHUNK == 0 for start, end in ranges)


def test_a_small_file_is_one_request_per_chunk_and_a_partial_last_chunk() -> None:
    plan = plan_of(20 * MIB)
    assert carve_all(plan, 4) == [(0, CHUNK), (CHUNK, 2 * CHUNK), (2 * CHUNK, 20 * MIB)]


def test_extents_already_held_are_never_requested_again() -> None:
    held = [_Extent(0, CHUNK, b"x" * 16, "u"), _Extent(5 * CHUNK, 3 * CHUNK, b"y" * 16, "u")]
    plan = plan_of(12 * CHUNK, held)
    covered = set()
    for start, end in carve_all(plan, 2):
        covered.update(range(start // CHUNK, -(-end // CHUNK)))
    assert covered == {1, 2, 3, 4, 8, 9, 10, 11}


def test_put_back_keeps_low_offsets_first() -> None:
    plan = plan_of(64 * CHUNK)
    first = plan.carve(4)
    second = plan.carve(4)
    plan.put_back(*first)  # the connection that had the front failed
    assert plan.carve(4)[0] == first[0]
    assert second[0] == first[1]
