"""lvllm's GPU path: routed experts queued on CUDA streams (lvllm.gpu.stream), experts
streamed to the GPU for long prompts (lvllm.gpu.ring), and the decisions both take
(lvllm.gpu.plan, plain Python). Driven by lvllm.hybrid.HybridExperts; nothing here knows
vLLM."""
