"""Shared helpers of the end-to-end tests on the real vLLM CPU engine with tiny random MoE models.

vLLM instances are expensive (30-40 s each eager, ~2 min compiled, on 2 cores), so every
(model, settings) combination is started at most once per session, its outputs and an lk
report are kept, and the instance is shut down before the next one starts.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
BUILDER = ROOT / "examples" / "tiny" / "build_tiny_model.py"

FAMILIES = ("qwen3_moe", "qwen2_moe", "deepseek_v2", "mixtral")

PROMPTS = [
    "the model reads the weights",
    "Question 3: what",
    "each core splits two experts again.",
    "Our server answers the request in host memory before the next step.",
]
MAX_TOKENS = 12


CPUS = sorted(os.sched_getaffinity(0))

# Settings every vLLM process of the tests shares (children inherit os.environ).
BASE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # apply_model() ships lvllm.vllm.hooks.lk_report to the worker.
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "VLLM_DISABLE_COMPILE_CACHE": "1",
    # The same cores for vLLM's threads and lk's (vLLM's default "auto" would keep one back).
    "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, CPUS)) if len(CPUS) > 1 else "nobind",
    "TOKENIZERS_PARALLELISM": "false",
    # The engine core in this process steps only inside generate(), after every prompt is
    # queued: with its own process it starts on the first prompt while the others are still
    # arriving, and the first batches take one, two or all prompts by timing. lk's integer
    # formats quantize a token's activations only in small per-expert batches, so outputs
    # would depend on that race (seen: INT4 prompt logprobs 0.017 apart between runs of one
    # checkpoint). The worker keeps its own process (distributed_executor_backend "mp").
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
LVLLM_VARS = ("LVLLM_MOE_NUMA_ENABLED", "LVLLM_GPU_RESIDENT_MOE_LAYERS", "LVLLM_MOE_USE_WEIGHT",
              "LVLLM_MOE_QUANT_GROUP_SIZE", "LVLLM_MOE_QUANT_ON_GPU", "LVLLM_DENSE_ON_LK",
              "LVLLM_DRAFT_MOE")


@contextmanager
def environment(**overrides):
    """Set variables for the vLLM instance about to start; restore afterwards."""
    saved = {k: os.environ.get(k) for k in (*BASE_ENV, *LVLLM_VARS, *overrides)}
    os.environ.update(BASE_ENV)
    for key in LVLLM_VARS:
        os.environ.pop(key, None)
    os.environ.update({k: str(v) for k, v in overrides.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build_model(out: Path, family: str, *builder_args: str) -> Path:
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, str(BUILDER), "--out", str(out), "--family", family,
                        *builder_args], check=True, capture_output=True)
    return out


class RunResult:
    def __init__(self, tokens, prompt_logprobs, report, prompt_token_ids=None, inspected=None):
        self.tokens = tokens                      # per prompt: greedy output token ids
        self.prompt_logprobs = prompt_logprobs    # per prompt: logprob of each prompt token
        self.report = report                      # per worker: lvllm.vllm.hooks.lk_report
        self.prompt_token_ids = prompt_token_ids  # per prompt: the ids vLLM tokenized it to
        self.inspected = inspected                # run_llm's inspect(llm), if given


def attention_backend(model: Path, dtype: str) -> str | None:
    """vLLM's pick, except for MLA models in float32: on CPUs with AMX tiles vLLM takes its
    AMX MLA backend, which packs bf16/fp16 weights only and refuses float32 at load ("expect
    weight to be bfloat16, float16, ..."), lk on or off; its reference CPU MLA backend
    computes float32 (and is what vLLM picks without AMX)."""
    config = json.loads((model / "config.json").read_text())
    return "CPU_MLA" if dtype == "float32" and "kv_lora_rank" in config else None


def run_llm(model: Path, *, lk: bool, dtype: str = "float32", eager: bool = True,
            resident: str | None = None, tp: int = 1, weight: str | None = None,
            group: int | None = None, quant_on_gpu: bool = False, dense: str | None = None,
            dense_weight: str | None = None, dense_group: int | None = None, llm_kwargs: dict | None = None, prompt_logprobs: bool = True,
            inspect=None) -> RunResult:
    """One vLLM instance: greedy tokens, prompt logprobs and lk_report of PROMPTS.
    ``llm_kwargs``: extra (or overriding) arguments of vllm.LLM; ``prompt_logprobs=False``
    leaves them out (empty lists); ``inspect(llm)``: called before shutdown, its result kept
    as ``RunResult.inspected``."""
    overrides = {"LVLLM_MOE_NUMA_ENABLED": "1" if lk else "0"}
    if dense is not None:
        overrides["LVLLM_DENSE_ON_LK"] = dense
    if dense_weight is not None:
        overrides["LVLLM_DENSE_USE_WEIGHT"] = dense_weight
    if dense_group is not None:
        overrides["LVLLM_DENSE_QUANT_GROUP_SIZE"] = str(dense_group)
    if weight is not None:
        overrides["LVLLM_MOE_USE_WEIGHT"] = weight
    if group is not None:
        overrides["LVLLM_MOE_QUANT_GROUP_SIZE"] = str(group)
    if quant_on_gpu:
        overrides["LVLLM_MOE_QUANT_ON_GPU"] = "1"
    if resident is not None:
        overrides["LVLLM_GPU_RESIDENT_MOE_LAYERS"] = resident
    ranks = tp * (llm_kwargs or {}).get("pipeline_parallel_size", 1)
    if ranks > 1:
        share = max(1, len(CPUS) // ranks)  # each rank its own cores when there are enough
        overrides["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            ",".join(str(CPUS[(r * share + i) % len(CPUS)]) for i in range(share))
            for r in range(ranks))
    with environment(**overrides):
        from vllm import LLM, SamplingParams

        from lvllm.vllm.hooks import lk_report

        kwargs = dict(model=str(model), dtype=dtype, enforce_eager=eager, max_model_len=256,
                      max_num_seqs=4, seed=0, enable_prefix_caching=False,
                      tensor_parallel_size=tp, distributed_executor_backend="mp",
                      disable_log_stats=True, attention_backend=attention_backend(model, dtype))
        llm = LLM(**{**kwargs, **(llm_kwargs or {})})
        try:
            params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                    prompt_logprobs=0 if prompt_logprobs else None,
                                    ignore_eos=True)
            outputs = llm.generate(PROMPTS, params, use_tqdm=False)
            tokens, logprobs, prompt_ids = [], [], []
            for out in outputs:
                tokens.append(list(out.outputs[0].token_ids))
                prompt_ids.append(list(out.prompt_token_ids))
                logprobs.append([entry[token].logprob
                                 for entry, token in zip(out.prompt_logprobs[1:],
                                                         out.prompt_token_ids[1:])]
                                if prompt_logprobs else [])
            report = llm.apply_model(lk_report)
            inspected = inspect(llm) if inspect is not None else None
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    return RunResult(tokens, logprobs, report, prompt_ids, inspected)




def draft_lk_report(worker) -> dict | None:
    """lvllm.vllm.hooks.lk_report of a worker's speculative-decoding draft model (None without
    one), for ``llm.collective_rpc``: ``LLM.apply_model`` reaches the target model only."""
    from lvllm.vllm.hooks import lk_report

    drafter = getattr(worker.model_runner, "drafter", None)
    model = getattr(drafter, "model", None)
    return lk_report(model) if model is not None else None
