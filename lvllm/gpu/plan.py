"""The GPU path's decisions, in plain Python (no CUDA): unit-tested on any machine.

- ``plan_batch``: which tokens of a forward the lk engine computes and which the streamed
  GPU experts compute;
- ``RingSchedule``: the order of copies and unpacks of the prefetch ring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


# --------------------------------------------------------------------------------------
# which tokens go where
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchPlan:
    """gpu_prefill False: every token on lk. True: ``lk_rows`` (the decode tokens, ascending;
    empty when there are none) stay on lk and every other row goes to the streamed GPU experts."""

    gpu_prefill: bool = False
    lk_rows: tuple[int, ...] = ()
    reason: str = ""



def plan_batch(num_tokens: int, query_lens: Sequence[int] | None, min_batch: int,
               capturing: bool, decode_query_len: int = 1) -> BatchPlan:
    """Decide one forward's split.

    num_tokens: rows of the forward (padding included); query_lens: tokens per request in
    row order (None: unknown, every row counts as prefill); min_batch:
    LVLLM_GPU_PREFILL_MIN_BATCH_SIZE (0: off); capturing: a CUDA graph is being captured (a
    graph replays whatever it captured, so it always takes the lk path); requests with at most
    ``decode_query_len`` tokens are decodes.
    """
    if min_batch <= 0:
        return BatchPlan(reason="GPU prefill off")
    if capturing:
        return BatchPlan(reason="CUDA graph capture")
    lk_rows: list[int] = []
    prefill_tokens = num_tokens
    if query_lens is not None:
        row = 0
        for length in query_lens:
            if length <= decode_query_len:
                lk_rows.extend(range(row, row + length))
            row += length
        # Rows past the last request are padding: they go with the prefill rows, uncounted.
        prefill_tokens = row - len(lk_rows)
    if prefill_tokens < min_batch:
        return BatchPlan(reason=f"{prefill_tokens} prefill tokens < {min_batch}")
    return BatchPlan(gpu_prefill=True, lk_rows=tuple(lk_rows),
                     reason=f"{prefill_tokens} prefill tokens >= {min_batch}")


def capture_overlap_warning(min_batch: int, max_capture_size: int) -> str | None:
    """Batches that replay a CUDA graph keep the lk path they were captured with, so a
    threshold at or below the largest captured size is never reached by such batches."""
    if 0 < min_batch <= max_capture_size:
        return (f"LVLLM_GPU_PREFILL_MIN_BATCH_SIZE={min_batch} is at or below the largest "
                f"CUDA graph size ({max_capture_size}): batches of {min_batch}-{max_capture_size} "
                "tokens replay a captured graph and keep the CPU path; set it above "
                f"{max_capture_size} or lower compilation_config.max_cudagraph_capture_size")
    return None


# --------------------------------------------------------------------------------------
# the prefetch ring
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Copy:
    """Copy layer ``position``'s experts into ring ``slot`` (on the copy stream, after the
    slot's previous unpack)."""

    position: int
    slot: int


@dataclass(frozen=True)
class Unpack:
    """Unpack ``slot`` into the compute buffer for layer ``position`` (on the compute stream,
    after the slot's copy); the slot is free for the next copy once this is done."""

    position: int
    slot: int


class RingSchedule:
    """Copies of ``layers`` streamed layers into ``window + 1`` ring slots, ``window`` layers
    ahead of the one being computed.

    Slot s holds positions s, s + slots, s + 2 * slots, ...; the copy of position q is issued
    while position q - window is processed, after the unpack of q - slots (the slot's
    previous user) was issued, so waiting on the slot's latest "unpacked" event is enough.
    """

    def __init__(self, layers: int, window: int):
        if window < 1:
            raise ValueError(f"prefetch window must be >= 1, got {window}")
        self.layers = layers
        self.window = window
        self.slots = min(window + 1, max(layers, 1))
        self._issued = -1   # highest position whose copy was issued in this forward
        self._next = 0      # the position expected next

    def slot(self, position: int) -> int:
        return position % self.slots

    def start(self) -> list[Copy]:
        """A forward begins: the first copies (issued as early as possible, so resident
        layers and attention hide them)."""
        self._issued, self._next = -1, 0
        return self._copies_through(self.window)

    def acquire(self, position: int) -> list[Copy | Unpack]:
        """What to issue before layer ``position`` computes; positions come in order."""
        if not 0 <= position < self.layers:
            raise IndexError(f"ring position {position} outside 0..{self.layers - 1}")
        if position != self._next:
            raise RuntimeError(f"ring positions must come in order: expected {self._next}, "
                               f"got {position} (start() begins a forward)")
        self._next = position + 1
        return [*self._copies_through(position + self.window), Unpack(position, self.slot(position))]

    def _copies_through(self, last: int) -> list[Copy]:
        last = min(last, self.layers - 1)
        copies = [Copy(q, self.slot(q)) for q in range(self._issued + 1, last + 1)]
        self._issued = max(self._issued, last)
        return copies
