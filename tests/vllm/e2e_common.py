"""Shared helpers of the end-to-end tests on the real vLLM CPU engine with tiny random MoE models:
building the models and running them in vLLM, the bounds lk's answers are held to and the
checks of lk's report, and float64 references of a checkpoint computed without vLLM.
(Serving with `vllm serve`: server_common.py.)

vLLM instances are expensive (on 2 cores: 5-10 s eager with the worker in this process, 15-30 s
with worker processes of their own, ~2 min compiled), so every (model, settings) combination is
started at most once per session, its outputs and an lk report are kept, and the instance is shut
down before the next one starts.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch


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
    "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, CPUS)),
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
              "LVLLM_ROUTERS_ON_LK", "LVLLM_DRAFT_MOE")


@contextmanager
def environment(**overrides):
    """Set variables for the vLLM instance about to start (None: unset); restore afterwards."""
    saved = {k: os.environ.get(k) for k in (*BASE_ENV, *LVLLM_VARS, *overrides)}
    os.environ.update(BASE_ENV)
    for key in LVLLM_VARS:
        os.environ.pop(key, None)
    for key, value in overrides.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(value)
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


# Dimensions of the quantized tiny checkpoints (build_model's builder arguments): multiples of
# 128 (vLLM's FP8 block checks; INT4 group 128), H 256 so each FP8 expert matrix holds several
# 128x128 blocks.
CHECKPOINT_DIMS = ("--dtype", "bfloat16", "--hidden-size", "256",
                   "--moe-intermediate-size", "128", "--num-heads", "2", "--num-kv-heads", "2",
                   "--head-dim", "64")


# Builder arguments of the tiny DeepSeek-V3 in lossy runs: routers skewed, as unskewed top-k
# margins (down to 7e-3) flip under any bf16 forward, vLLM's own included.
DEEPSEEK_LOSSY_DIMS = ("--dtype", "bfloat16", "--router-skew", "3")


class RunResult:
    def __init__(self, tokens, prompt_logprobs, report, prompt_token_ids=None, inspected=None, kv_cache=None):
        self.tokens = tokens                      # per prompt: greedy output token ids
        self.prompt_logprobs = prompt_logprobs    # per prompt: logprob of each prompt token
        self.report = report                      # per worker: lvllm.vllm.hooks.lk_report
        self.prompt_token_ids = prompt_token_ids  # per prompt: the ids vLLM tokenized it to
        self.inspected = inspected                # run_llm's inspect(llm), if given
        self.kv_cache = kv_cache                  # the first worker's kv_cache_layers


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
            inspect=None, prepare=None, env: dict | None = None, cpp_wrapper: bool = False) -> RunResult:
    """One vLLM instance: greedy tokens, prompt logprobs and lk_report of PROMPTS.
    ``llm_kwargs``: extra (or overriding) arguments of vllm.LLM; ``prompt_logprobs=False``
    leaves them out (empty lists); ``inspect(llm)``: called before shutdown, its result kept
    as ``RunResult.inspected``; ``prepare(llm)``: called before the prompts are generated;
    ``env``: further variables for the instance; ``cpp_wrapper``: a compiled lk run with
    inductor's C++ wrapper (LVLLM_CPU_CPP_WRAPPER), off unless asked: compiling it costs about
    20 s an instance on 2 cores, and its outputs are test_compiled_same_answers' subject."""
    ranks = tp * (llm_kwargs or {}).get("pipeline_parallel_size", 1)
    # One rank, eager, on this process's cores: the worker runs in this process (vLLM's "uni"
    # executor), its plugins loaded afresh; spawning one costs ~7 s of imports. Compiled runs,
    # several ranks and vLLM's Transformers backend (it decorates transformers' own model classes,
    # which the float64 references build too) take processes of their own.
    in_process = (ranks == 1 and eager and set(CPUS) <= os.sched_getaffinity(0)
                  and (llm_kwargs or {}).get("model_impl", "auto") != "transformers")
    overrides = {"LVLLM_MOE_NUMA_ENABLED": "1" if lk else "0"}
    if lk:
        # What lvllm's plugin sets in the process that starts vLLM's workers (compile_options);
        # this process took it at import (tests/conftest.py).
        overrides["VLLM_USE_LAYERNAME"] = "0"
        overrides["LVLLM_CPU_CPP_WRAPPER"] = "1" if cpp_wrapper else "0"
        # Each shortcut through the step, wherever taken, against vLLM's own code from the same state.
        overrides["LVLLM_CPU_STEP_SHORTCUTS"] = "CHECK"
    elif not in_process:
        overrides["VLLM_USE_LAYERNAME"] = None   # vLLM's own default in its own processes
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
    overrides.update(env or {})
    if ranks > 1:
        share = max(1, len(CPUS) // ranks)  # each rank its own cores when there are enough
        overrides["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            ",".join(str(CPUS[(r * share + i) % len(CPUS)]) for i in range(share))
            for r in range(ranks))
    with environment(**overrides), instance_scope(in_process):
        from vllm import LLM, SamplingParams

        from lvllm.vllm.hooks import lk_report

        kwargs = dict(model=str(model), dtype=dtype, enforce_eager=eager, max_model_len=256,
                      max_num_seqs=4, seed=0, enable_prefix_caching=False, tensor_parallel_size=tp,
                      distributed_executor_backend="uni" if in_process else "mp",
                      disable_log_stats=True, attention_backend=attention_backend(model, dtype))
        llm = LLM(**{**kwargs, **(llm_kwargs or {})})
        try:
            if prepare is not None:
                prepare(llm)
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
            kv_cache = llm.collective_rpc(kv_cache_layers)[0]
            inspected = inspect(llm) if inspect is not None else None
            if not in_process:
                llm.collective_rpc(exit_without_teardown)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
    return RunResult(tokens, logprobs, report, prompt_ids, inspected, kv_cache)


@contextmanager
def instance_scope(in_process: bool):
    """Around a vLLM instance whose worker runs in this process: vLLM's plugins load afresh
    (lvllm's reads this instance's settings, as a new worker would), and lvllm's installation,
    vLLM's distributed state and its frozen objects are gone afterwards, the start failed or not."""
    from lvllm.lk import runtime

    # lk's runtime is made once a process (its workers chosen then): the worker makes its own,
    # and this process's earlier one is back afterwards.
    earlier_runtime = runtime._default
    if in_process:
        fresh_plugins()
        runtime._default = None
    try:
        yield
    finally:
        if in_process:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
            fresh_plugins()
            runtime._default = earlier_runtime
        gc.collect()


def fresh_plugins() -> None:
    import vllm.plugins

    from lvllm.vllm.hooks import uninstall

    uninstall()
    vllm.plugins.plugins_loaded = False


def kv_cache_layers(worker) -> dict:
    """For ``llm.collective_rpc``: what each layer keeps in the KV cache, by the worker's own
    KV cache spec: name -> (spec class, K/V heads, K and V elements a head, window,
    the state's tensors as (elements, bytes a value))."""
    layers = {}
    for name, spec in worker.model_runner.get_kv_cache_spec().items():
        states = tuple((math.prod(shape), dtype.itemsize) for shape, dtype in zip(getattr(spec, "shapes", ()),
                                                                                  getattr(spec, "dtypes", ())))
        heads = getattr(spec, "num_kv_heads", 0)
        elements = getattr(spec, "head_size", 0) + getattr(spec, "head_size_v", 0)
        window = getattr(spec, "sliding_window", None) or getattr(spec, "attention_chunk_size", None) or 0
        layers[name] = (type(spec).__name__, heads, elements, window, states)
    return layers




def exit_without_teardown(worker) -> None:
    """For ``llm.collective_rpc`` before shutdown: once vLLM has shut the worker down, its
    process ends without Python's teardown of torch and vLLM (about 3 s of a core for each
    instance; orderly exits are test_shutdown's subject)."""
    import atexit

    def leave():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    atexit.register(leave)


def draft_lk_report(worker) -> dict | None:
    """lvllm.vllm.hooks.lk_report of a worker's speculative-decoding draft model (None without
    one), for ``llm.collective_rpc``: ``LLM.apply_model`` reaches the target model only."""
    from lvllm.vllm.hooks import lk_report

    drafter = getattr(worker.model_runner, "drafter", None)
    model = getattr(drafter, "model", None)
    return lk_report(model) if model is not None else None


def record_proposals(worker) -> None:
    """For ``llm.collective_rpc`` before generating: keep every draft the worker's drafter
    proposes (``recorded_proposals`` reads them back)."""
    runner = worker.model_runner
    propose = runner.propose_draft_token_ids
    runner.lvllm_proposals = []

    def recording(*args, **kwargs):
        drafts = propose(*args, **kwargs)
        rows = drafts.tolist() if hasattr(drafts, "tolist") else [list(row) for row in drafts]
        runner.lvllm_proposals.append(rows)
        return drafts

    runner.propose_draft_token_ids = recording


def recorded_proposals(worker) -> list:
    """The drafts record_proposals kept, step by step: per request, the proposed token ids."""
    return worker.model_runner.lvllm_proposals


DRAFT_EXPERT_CALLS = 6


def lk_layers(model):
    """(name, lk's fused-MoE method) of each of ``model``'s MoE layers lk computes."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    from lvllm.vllm.moe_layer import LkMoEMethod

    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, RoutedExperts) and isinstance(method, LkMoEMethod) and method.experts:
            yield name, method


def record_draft_experts(worker) -> None:
    """For ``llm.collective_rpc`` before generating: keep the first DRAFT_EXPERT_CALLS
    forwards of each of the draft model's lk layers (input, routing, routed experts' output),
    for a reference to recompute (``recorded_draft_experts`` reads them back)."""
    drafter = getattr(worker.model_runner, "drafter", None)
    worker.model_runner.lvllm_draft_experts = calls = {}
    for name, method in lk_layers(drafter.model):
        experts, kept = method.experts, calls.setdefault(name, [])

        def recording(x, topk_ids, topk_weights, *args, _forward=experts.forward, _kept=kept, **kwargs):
            shared, routed = _forward(x, topk_ids, topk_weights, *args, **kwargs)
            if len(_kept) < DRAFT_EXPERT_CALLS:
                _kept.append(tuple(t.detach().float().cpu().clone() for t in (x, topk_ids, topk_weights, routed)))
            return shared, routed

        experts.forward = recording


def recorded_draft_experts(worker) -> dict:
    return worker.model_runner.lvllm_draft_experts


def run_every_expert(worker, part: str) -> dict:
    """For ``llm.collective_rpc``: each lk layer of the model whose name holds ``part``, run once by
    lk on fixed rows, each row sent to every expert with equal weights: name -> (rows, expert ids,
    weights, routed experts' output), as record_draft_experts keeps a forward."""
    outputs = {}
    for name, method in lk_layers(worker.model_runner.model):
        if part in name:
            engine = method.experts.engine
            x = torch.randn(4, engine.hidden_size, generator=torch.Generator().manual_seed(0))
            ids = torch.arange(engine.num_experts, dtype=torch.int32).repeat(len(x), 1)
            weights = torch.full(ids.shape, 1 / engine.num_experts)
            outputs[name] = (x, ids, weights, method.experts.submit(x, ids, weights).wait().clone())
    return outputs


# --------------------------------------------------------------------------------------
# what a run is held to: lk's answers against vLLM's own, and what lk_report must show
# --------------------------------------------------------------------------------------

# float32: greedy tokens identical and prompt logprobs within F32_LOGPROB_TOL (measured:
# ~3e-6). bfloat16: both sides round to bf16 at different points (vLLM's CPU kernel vs lk),
# so the yardstick is the float32 run: lk in bf16 must stay as close to it as vLLM's own bf16
# MoE does (within BF16_SLACK x vLLM's deviation + 0.05; measured on the tiny Qwen3-MoE: vLLM
# bf16 0.35, lk bf16 0.15 max prompt-logprob deviation), lk vs vLLM in bf16 within
# BF16_LOGPROB_TOL, and the first BF16_SAME_PREFIX greedy tokens identical (tokens may part
# after a near tie). tools/airgap/e2e_checks.py applies the same bounds on CUDA
# (tests/test_e2e_checks.py keeps them equal).
F32_LOGPROB_TOL = 1e-3
BF16_LOGPROB_TOL = 0.75
BF16_SLACK = 1.5
BF16_SAME_PREFIX = 4
# Lossy runs (bfloat16, lk's 8-bit activations) against a float64 reference of the same
# checkpoint, derived in test_families' docstring: the median prompt-logprob deviation below
# LOSSY_MEDIAN_TOL (about 2^-8 of the logits' spread), the largest below LOSSY_MAX_TOL (a
# flipped router near tie moves a token by a few units), the first LOSSY_SAME_PREFIX greedy
# tokens within BF16_LOGPROB_TOL of the reference's best.
LOSSY_MEDIAN_TOL = 16 * 2.0 ** -8
LOSSY_MAX_TOL = 2 * BF16_LOGPROB_TOL
LOSSY_SAME_PREFIX = 4


def layer_index(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def assert_lk_computed(report, lk_layers: set[int], device_layers: set[int] = frozenset()):
    """Each worker put exactly ``lk_layers`` on lk and ``device_layers`` on the device; every lk
    layer's engine counted forwards and was converted while loading, vLLM's own copies of its
    expert weights are gone (zero-size host tensors), and the start-up line counts the layers."""
    for worker in report:
        on_lk = {layer_index(n): v for n, v in worker["lk_layers"].items()}
        on_device = {layer_index(n) for n in worker["device_layers"]}
        assert set(on_lk) == lk_layers, worker
        assert on_device == set(device_layers), worker
        for index, layer in on_lk.items():
            assert layer["forward_calls"] > 0, f"layer {index}: lk never ran"
            assert layer["nbytes"] > 0
            assert layer["converted_while_loading"], f"layer {index}: converted after the whole model loaded"
            for name, (shape, device) in layer["params"].items():
                assert device == "cpu", (index, name, device)
                if name in ("w13_weight", "w2_weight"):
                    assert tuple(shape) == (0,), f"layer {index}: vLLM's {name} was not freed"
        assert worker["summary"] and f"{len(lk_layers)} MoE layer(s) on lk" in worker["summary"]


def assert_upstream(report):
    """lk took no layer: vLLM's own MoE, dense and attention paths ran everything, none of
    lvllm's step or op hooks was in place, and lvllm logged no start-up line."""
    for worker in report:
        assert worker["lk_layers"] == {}
        assert worker["summary"] is None
        assert all(v["method"] != "LkMoEMethod" for v in worker["device_layers"].values())
        assert worker["dense_layers"]["lk"] == {}, worker["dense_layers"]
        hooks = {key: worker[key] for key in ("attention_calls", "native_lk_op_calls", "step_shortcuts",
                                              "compile_wrapper")}
        assert set(hooks.values()) == {None}, hooks


def max_logprob_diff(a, b) -> float:
    return max(abs(x - y) for pa, pb in zip(a.prompt_logprobs, b.prompt_logprobs)
               for x, y in zip(pa, pb))


# --------------------------------------------------------------------------------------
# float64 references: the same checkpoint's forward without vLLM
# --------------------------------------------------------------------------------------


class TransformersReference:
    """The checkpoint in transformers, float64, eager attention and experts (MXFP4 experts
    dequantized by transformers' own gpt-oss integration)."""

    def __init__(self, model: Path):
        from transformers_models import model_class

        config = json.loads((model / "config.json").read_text())
        extra = {}
        if config.get("quantization_config", {}).get("quant_method") == "mxfp4":
            from transformers import Mxfp4Config

            extra["quantization_config"] = Mxfp4Config(dequantize=True)
        self.model, info = model_class(config["model_type"]).from_pretrained(
            model, dtype=torch.float64, attn_implementation="eager",
            experts_implementation="eager", output_loading_info=True, **extra)
        # Every tensor the model reads came from the checkpoint (none left at its init);
        # only layers after the decoder's (MTP) may go unused.
        assert not info["missing_keys"] and not info["mismatched_keys"], info
        beyond = f"model.layers.{config.get('num_hidden_layers')}."
        assert all(k.startswith(beyond) for k in info["unexpected_keys"]), info
        # transformers dequantizes MXFP4 into bf16 (exact: e2m1 times a power of two).
        self.model.double().eval()

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(torch.tensor([ids]), use_cache=False).logits[0]
        return torch.log_softmax(logits.double(), dim=-1)


# Tensors of a quantized projection that dequantize() folds into its `weight` (GPTQ's, ModelOpt NVFP4's).
_QUANTIZATION_TENSORS = ("qzeros", "scales", "g_idx", "weight_scale", "weight_scale_2", "input_scale")


def dequantized_twin(model: Path, out: Path) -> Path:
    """A float64 copy of a checkpoint whose projections are GPTQ or ModelOpt NVFP4: each one's
    tensors turned into its `weight` (lvllm.dequantize.dequantize), the rest as stored, no
    quantization config (for TransformersReference)."""
    from safetensors.torch import save_file

    from lvllm.dequantize import dequantize
    from lvllm.reference import CheckpointTensors

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True)
    tensors = CheckpointTensors(model)
    twin = {}
    for name in tensors.file_of:
        stem, _, suffix = name.rpartition(".")
        if suffix == "qweight" or (suffix == "weight" and f"{stem}.weight_scale_2" in tensors):
            twin[f"{stem}.weight"] = dequantize(tensors, stem)
        elif suffix not in _QUANTIZATION_TENSORS:
            twin[name] = tensors.get(name).double()
    save_file(twin, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "float64"}, indent=2))
    for other in model.iterdir():
        if other.suffix != ".safetensors" and other.name not in ("config.json", "hf_quant_config.json"):
            shutil.copy(other, out / other.name)
    return out


def dequantized_reference(model: Path, out: Path) -> "CachedReference":
    """The float64 reference of a quantized checkpoint: its dequantized twin, written to ``out``."""
    return CachedReference(TransformersReference(dequantized_twin(model, out)))


class CachedReference:
    """A reference's log-probabilities, computed once per token sequence."""

    def __init__(self, reference):
        self.reference, self.cache = reference, {}

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        key = tuple(ids)
        if key not in self.cache:
            self.cache[key] = self.reference.logprobs(list(ids))
        return self.cache[key]


def deviations(run, reference) -> tuple[list[float], list[list[float]]]:
    """Per prompt token: |prompt logprob - the reference's|; per prompt, per generated
    token: how far below the reference's best token (after the same prefix) it is."""
    prompt, shortfalls = [], []
    for ids, logprobs, generated in zip(run.prompt_token_ids, run.prompt_logprobs, run.tokens):
        sequence = ids + generated
        reference_logprobs = reference.logprobs(sequence)
        prompt += [abs(value - float(reference_logprobs[i, sequence[i + 1]]))
                   for i, value in enumerate(logprobs)]
        rows = reference_logprobs[len(ids) - 1:len(ids) - 1 + len(generated)]
        shortfalls.append([float(row.max() - row[token]) for row, token in zip(rows, generated)])
    return prompt, shortfalls


# --------------------------------------------------------------------------------------
# a run against its float64 reference (test_families, test_architectures, test_drafts)
# --------------------------------------------------------------------------------------

# float32 rounding (6e-8 relative) over 2 layers of dot products up to 128 long moves unit-scale
# logits by about 1e-6 (measured: 3e-7 to 3.2e-6); the families' looser F32_LOGPROB_TOL would
# pass GELU's erf form for Gemma 4's tanh form (3.7e-4 apart).
SWEEP_LOGPROB_TOL = 1e-4

# vLLM's torch RoPE in an eager run, for the architectures its CPU RoPE op rotates wrong
# (architecture_table.CPU_ROPE_3D).
EAGER_TORCH_ROPE = {"compilation_config": {"custom_ops": ["all", "-rotary_embedding"]}}


# Relative error of the routed experts' output against float64: float32 rounding over dot
# products 64 long (~1e-7, measured below 1e-6); bfloat16 runs round inputs, weights and
# output to 8 bits (2^-8).
EXPERTS_TOL = {"float32": 1e-5, "bfloat16": 2 ** -6}


def experts_float64(tensors: dict, prefix: str, x, topk_ids, topk_weights):
    """The routed experts' output in float64 from the checkpoint's tensors (SiLU, gated)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    x = x.double()
    for token in range(x.shape[0]):
        for expert, weight in zip(topk_ids[token].long().tolist(), topk_weights[token].double()):
            def proj(name):
                stacked = tensors.get(f"{prefix}.{name}.weight")   # [E, out, in] (Step-3.5)
                return (stacked[expert] if stacked is not None
                        else tensors[f"{prefix}.{expert}.{name}.weight"]).double()
            hidden = torch.nn.functional.silu(proj("gate_proj") @ x[token]) * (proj("up_proj") @ x[token])
            out[token] += weight * (proj("down_proj") @ hidden)
    return out


def planned_tensor_bytes(tensors, layers, not_planned: str = "") -> int:
    """The checkpoint's bytes that lvllm plan counts outside the routed experts: every tensor but
    the experts' (ExpertLayer.tensor_names of each layer's sets), the vectors (is_matrix: norms,
    biases, routers' scales and correction biases, which plan leaves out) and those whose name
    ``not_planned`` (a pattern, which must match some) finds."""
    experts = {name for sets in layers.values() for layer in sets for name in layer.tensor_names(tensors)}
    unplanned = {name for name in tensors.file_of if not_planned and re.search(not_planned, name)}
    assert bool(unplanned) == bool(not_planned), f"{not_planned!r} matches none of the checkpoint's tensors"
    return sum(tensors.get(name).nbytes for name in tensors.file_of
               if name not in experts | unplanned and is_matrix(name, tensors.shape(name)))


def is_matrix(name: str, shape) -> bool:
    """Two dimensions above 1, or a linear layer's [1, inputs] weight (Qwen's shared_expert_gate); not
    ERNIE's [1, experts] correction bias."""
    return sum(size > 1 for size in shape) >= 2 or (len(shape) == 2 and name.endswith(".weight"))


def assert_plan_reads_kv_cache(model: Path, run) -> None:
    """lvllm plan's reading of the checkpoint's config (lvllm.kv_layout) is, layer by layer, what
    the run's worker keeps in its KV cache (kv_cache_layers): the kind, K/V heads and their
    elements a token, the window; a state's convolution and recurrent elements. Where vLLM's CPU
    platform keeps recurrent states in float32 (CPUs with AVX-512 BF16), plan counts that;
    elsewhere plan's float32 is an upper bound."""
    from collections import Counter
    from dataclasses import replace

    from lvllm.kv_layout import CHUNKED, FULL, SLIDING, STATE, CacheLayer
    from lvllm.model_shape import model_shape, state_bytes

    # vLLM's KV cache spec classes, as lvllm.kv_layout names what a layer keeps.
    spec_kinds = {"FullAttentionSpec": FULL, "MLAAttentionSpec": FULL, "SlidingWindowSpec": SLIDING,
                  "ChunkedLocalAttentionSpec": CHUNKED, "MambaSpec": STATE}

    shape = model_shape(json.loads((model / "config.json").read_text()))
    kept = Counter()
    for name, (spec, heads, elements, window, states) in run.kv_cache.items():
        kind = spec_kinds[spec]
        if kind == STATE:
            (conv, _), *recurrent = states
            kept[CacheLayer(STATE, conv_elements=conv, ssm_elements=sum(n for n, _ in recurrent))] += 1
            if torch.cpu._is_avx512_bf16_supported():
                assert all(size == state_bytes(shape, gpus=0) for _, size in recurrent), (name, states)
        else:
            kept[CacheLayer(kind, heads, elements, window)] += 1
    assert Counter({replace(layer, count=1): layer.count for layer in shape.cache}) == kept, (shape.cache, kept)


def assert_close_to_reference(run, reference) -> str:
    prompt, shortfalls = deviations(run, reference)
    described = (f"prompt logprobs max {max(prompt):.3g}, median {statistics.median(prompt):.3g}; "
                 f"greedy tokens' shortfalls {[round(max(s), 4) for s in shortfalls]}")
    assert any(len(set(tokens)) > 3 for tokens in run.tokens), f"degenerate greedy output: {run.tokens}"
    assert max(prompt) < SWEEP_LOGPROB_TOL, described
    assert max(max(s) for s in shortfalls) <= SWEEP_LOGPROB_TOL, described
    return described


def assert_lk_ran(report, lk_layers: set[int]):
    """e2e_common.assert_lk_computed but for the conversion's timing, which
    test_lk_converts_while_loading checks on its own."""
    for worker in report:
        on_lk = {layer_index(n): v for n, v in worker["lk_layers"].items()}
        assert set(on_lk) == lk_layers and worker["device_layers"] == {}, worker
        for index, layer in on_lk.items():
            assert layer["forward_calls"] > 0, f"layer {index}: lk never ran"
            assert layer["nbytes"] > 0
            for name, (shape, device) in layer["params"].items():
                assert device == "cpu", (index, name, device)
                if name in ("w13_weight", "w2_weight"):
                    assert tuple(shape) == (0,), f"layer {index}: vLLM's {name} was not freed"
        assert worker["summary"] and f"{len(lk_layers)} MoE layer(s) on lk" in worker["summary"]


def assert_matches_reference(run, reference, family, baseline=None):
    """``baseline``: vLLM's own run in the same lossy dtype, which lk must match in
    closeness to the reference."""
    assert len(run.tokens) == len(PROMPTS) and all(len(t) == MAX_TOKENS for t in run.tokens)
    # Random weights, but not degenerate: the greedy outputs are not one token repeated.
    assert any(len(set(t)) > 3 for t in run.tokens)
    prompt, shortfalls = deviations(run, reference)
    described = (f"prompt logprobs max {max(prompt):.3g}, median {statistics.median(prompt):.3g}"
                 f"; greedy tokens' shortfalls {[round(max(s), 3) for s in shortfalls]}")
    if not family.lossy:
        assert max(prompt) < F32_LOGPROB_TOL, described
        assert max(max(s) for s in shortfalls) <= F32_LOGPROB_TOL, described
        return
    assert statistics.median(prompt) < LOSSY_MEDIAN_TOL, described
    assert max(prompt) < LOSSY_MAX_TOL, described
    assert max(max(s[:LOSSY_SAME_PREFIX]) for s in shortfalls) <= BF16_LOGPROB_TOL, described
    if baseline is not None:
        own, _ = deviations(baseline, reference)
        assert max(prompt) <= BF16_SLACK * max(own) + 0.05, (described, "vLLM's own", max(own))
        assert (statistics.median(prompt) <= BF16_SLACK * statistics.median(own) + 2.0 ** -8), (
            described, "vLLM's own median", statistics.median(own))
