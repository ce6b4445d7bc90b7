"""Loads a model in this process (the worker too) and reports, for test_load_memory.py:

    LOADED <RssAnon bytes>      once LLM() is up
    TOKENS <json>               greedy tokens of two prompts
    SUMMARY <json>              lk's start-up line

    python load_child.py MODEL
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def anon_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from lvllm.vllm.hooks import placement

    llm = LLM(model=sys.argv[1], dtype="bfloat16", enforce_eager=True, max_model_len=128,
              max_num_seqs=2, seed=0, enable_prefix_caching=False, disable_log_stats=True,
              kv_cache_memory_bytes=64 * 2**20)  # small, so the KV cache does not hide the load's peak
    print(f"LOADED {anon_rss()}", flush=True)
    outputs = llm.generate(["the model reads the weights", "each core splits"],
                           SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)
    print("SUMMARY " + json.dumps(placement().summary if placement() else None), flush=True)


if __name__ == "__main__":
    main()
