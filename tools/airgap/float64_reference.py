"""The e2e checks' independent reference on CUDA: a checkpoint's forward in transformers in
float64, with where rounding may rightly change the answer.

vLLM's own float32 path on a GPU is not float32-exact (its matmuls and fused-MoE kernels run in
TF32), so on CUDA lk is held to this reference, not to vLLM's answers. A router whose k-th and
(k+1)-th expert probabilities are closer than ROUTE_TIE, or a greedy step whose top two
logprobs are closer than TOKEN_TIE, may go either way under any float32 rounding: prompt
positions with such a routing tie are not compared, and generated tokens are compared up to the
first step with either.
"""

from __future__ import annotations

from pathlib import Path

ROUTE_TIE = 1e-3
TOKEN_TIE = 0.01


class Float64Reference:
    def __init__(self, model_path: Path):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float64, attn_implementation="eager", experts_implementation="eager").eval()
        self.top_k = self.model.config.num_experts_per_tok
        experts = self.model.config.num_experts
        self.margins: list = []
        for name, module in self.model.named_modules():
            weight = getattr(module, "weight", None)
            if name.endswith("mlp.gate") and weight is not None and weight.shape[0] == experts:
                module.register_forward_hook(self._record_margin)

    def _record_margin(self, module, inputs, output) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        probs = self.torch.softmax(x @ module.weight.T, dim=-1).sort(dim=-1, descending=True).values
        self.margins.append(probs[:, self.top_k - 1] - probs[:, self.top_k])

    def _forward(self, ids: list[int]):
        """Logprobs at every position and, per position, whether some router was near a tie."""
        self.margins = []
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([ids]), use_cache=False).logits[0]
        tied = self.torch.stack(self.margins).min(dim=0).values < ROUTE_TIE
        return self.torch.log_softmax(logits, dim=-1), tied

    def answer(self, prompt_ids: list[int], steps: int) -> dict:
        """Prompt-token logprobs (None at routing ties), the greedy continuation, and per step
        whether it was a tie."""
        logprobs, tied = self._forward(prompt_ids)
        # Token i's logprob comes from position i - 1's logits: that position's routing decides.
        prompt = [None if tied[i - 1] else logprobs[i - 1, prompt_ids[i]].item() for i in range(1, len(prompt_ids))]
        sequence, ties = list(prompt_ids), []
        for _ in range(steps):
            top = logprobs[-1].topk(2)
            ties.append(bool(tied[-1]) or (top.values[0] - top.values[1]).item() < TOKEN_TIE)
            sequence.append(int(top.indices[0]))
            logprobs, tied = self._forward(sequence)
        return {"prompt_token_ids": list(prompt_ids), "prompt_logprobs": prompt,
                "token_ids": sequence[len(prompt_ids):], "ties": ties}


def deviation(answer: dict, reference: dict) -> float:
    """The largest prompt-logprob difference at the positions the reference compares."""
    pairs = zip(answer["prompt_logprobs"], reference["prompt_logprobs"])
    return max((abs(a - r) for a, r in pairs if r is not None), default=0.0)


def same_until_tie(answer: dict, reference: dict) -> bool:
    """The generated tokens equal the reference's before its first tie (the tied step's token,
    and every one after it, may differ)."""
    ties = reference["ties"]
    first = ties.index(True) if True in ties else len(ties)
    return answer["token_ids"][:first] == reference["token_ids"][:first]
