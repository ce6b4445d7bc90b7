"""The lk engine against a float64 torch reference, on fresh random data."""

from __future__ import annotations

import gc
import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from lvllm import _lk, envs
from lvllm.lk import MoEEngine, make_runtime

from .helpers import ISA_ORDER, SUPPORTED_ISAS, assert_close, random_experts, random_routing, reference_moe


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 7, 16, 61, 1024])
def test_matches_reference_per_isa_and_dtype(runtimes, isa, weight_dtype, tokens):
    # Sizes not multiples of any SIMD width or of the 16-column panel.
    experts, hidden, intermediate, k = 9, 72 + 7, 40 + 13, 4
    w13, w2 = random_experts(experts, hidden, intermediate, weight_dtype, seed=tokens)
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa))
    x = torch.randn(tokens, hidden).to(weight_dtype)
    ids, weights = random_routing(tokens, experts, k, seed=tokens + 1)
    out = engine.forward(x, ids, weights)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, reference_moe(w13, w2, x, ids, weights), weight_dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu", "swigluoai", "gelu_tanh"])
@pytest.mark.parametrize("tokens", [2, 40])
def test_activations(runtimes, activation, tokens):
    experts, hidden, intermediate, k = 6, 64, 48, 2
    w13, w2 = random_experts(experts, hidden, intermediate, torch.float32, seed=3)
    w13 = w13 * 4  # push gates past swigluoai's clamp limit on some rows
    engine = MoEEngine(w13, w2, activation=activation, swiglu_alpha=1.5, swiglu_limit=3.0, runtime=runtimes())
    x = torch.randn(tokens, hidden)
    ids, weights = random_routing(tokens, experts, k, seed=4)
    ref = reference_moe(w13, w2, x, ids, weights, activation, alpha=1.5, limit=3.0)
    assert_close(engine.forward(x, ids, weights), ref, torch.float32)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 70])
@pytest.mark.parametrize("numa_nodes", [1, 2])
def test_expert_biases(runtimes, weight_dtype, tokens, numa_nodes):
    """gpt-oss's biases: gate/up's before the clamped activation, down's weighted by routing;
    sizes off the panel width, two nodes so a node's slice of the biases starts past row 0."""
    experts, hidden, intermediate, k = 7, 72 + 5, 64 + 16, 3
    w13, w2 = random_experts(experts, hidden, intermediate, weight_dtype, seed=tokens)
    generator = torch.Generator().manual_seed(tokens + 7)
    w13_bias = torch.randn(experts, 2 * intermediate, generator=generator)
    w2_bias = torch.randn(experts, hidden, generator=generator).to(torch.bfloat16)
    engine = MoEEngine(w13, w2, activation="swigluoai", w13_bias=w13_bias, w2_bias=w2_bias,
                       runtime=runtimes(numa_nodes=numa_nodes))
    x = torch.randn(tokens, hidden).to(weight_dtype)
    ids, weights = random_routing(tokens, experts, k, seed=tokens + 2)
    ids[0, 1] = ids[0, 0]   # a repeated expert: its bias counts with both weights
    ref = reference_moe(w13, w2, x, ids, weights, "swigluoai", w13_bias=w13_bias, w2_bias=w2_bias)
    assert_close(engine.forward(x, ids, weights), ref, weight_dtype)


def test_expert_bias_shapes_are_checked(runtimes):
    w13, w2 = random_experts(3, 32, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"w13_bias must be \[3, 32\]"):
        MoEEngine(w13, w2, w13_bias=torch.zeros(3, 16), runtime=runtimes())
    with pytest.raises(ValueError, match=r"w2_bias must be \[3, 32\]"):
        MoEEngine(w13, w2, w2_bias=torch.zeros(3, 16), runtime=runtimes())


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_topk_and_id_dtypes(runtimes, k, id_dtype):
    experts, hidden, intermediate, tokens = 10, 48, 32, 33
    w13, w2 = random_experts(experts, hidden, intermediate, torch.bfloat16, seed=k)
    engine = MoEEngine(w13, w2, runtime=runtimes())
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    ids, weights = random_routing(tokens, experts, k, seed=k, id_dtype=id_dtype)
    assert_close(engine.forward(x, ids, weights), reference_moe(w13, w2, x, ids, weights), torch.bfloat16)


def test_negative_ids_are_skipped(runtimes):
    experts, hidden, intermediate, tokens, k = 8, 40, 24, 20, 4
    w13, w2 = random_experts(experts, hidden, intermediate, torch.float32, seed=5)
    engine = MoEEngine(w13, w2, runtime=runtimes())
    x = torch.randn(tokens, hidden)
    ids, weights = random_routing(tokens, experts, k, seed=6)
    ids[::2, 1] = -1
    ids[3] = -1  # a token with no expert at all gets zeros
    out = engine.forward(x, ids, weights)
    assert_close(out, reference_moe(w13, w2, x, ids, weights), torch.float32)
    assert torch.count_nonzero(out[3]) == 0


@pytest.mark.parametrize("ranks", [2, 4])
def test_expert_parallel_ranks_sum_to_the_whole_layer(runtimes, ranks):
    """As vLLM's expert parallelism places them: rank r holds a contiguous block of the
    experts, routes other ranks' ids to -1, and the ranks' outputs summed (its all-reduce)
    are the whole layer's."""
    experts, hidden, intermediate, tokens, k = 16, 64, 48, 37, 4
    w13, w2 = random_experts(experts, hidden, intermediate, torch.bfloat16, seed=ranks)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    ids, weights = random_routing(tokens, experts, k, seed=ranks + 1)
    per_rank = experts // ranks
    total = torch.zeros(tokens, hidden, dtype=torch.float64)
    for rank in range(ranks):
        first = rank * per_rank
        engine = MoEEngine(w13[first:first + per_rank], w2[first:first + per_rank], runtime=runtimes())
        local = torch.where((ids >= first) & (ids < first + per_rank), ids - first, torch.full_like(ids, -1))
        total += engine.forward(x, local, weights).double()
    assert_close(total, reference_moe(w13, w2, x, ids, weights), torch.bfloat16)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 300])
def test_all_tokens_on_one_expert(runtimes, threads, tokens):
    experts, hidden, intermediate, k = 16, 96, 80, 1
    w13, w2 = random_experts(experts, hidden, intermediate, torch.bfloat16, seed=7)
    engine = MoEEngine(w13, w2, runtime=runtimes(threads=threads))
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    ids = torch.full((tokens, k), 11, dtype=torch.int32)
    weights = torch.rand(tokens, k)
    assert_close(engine.forward(x, ids, weights), reference_moe(w13, w2, x, ids, weights), torch.bfloat16)


@pytest.mark.parametrize("threads, numa_nodes", [(1, 0), (2, 0), (2, 3)])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 4, 70])
def test_tasks_walking_runs_of_panels(runtimes, threads, numa_nodes, weight_dtype, tokens):
    # Wide enough that a task walks a run of several panels of an expert in both phases
    # (gate/up: 31 panels, down: 39), with a shorter last run ending in a partial panel.
    experts, hidden, intermediate, k = 8, 16 * 38 + 5, 16 * 30 + 3, 4
    w13, w2 = random_experts(experts, hidden, intermediate, weight_dtype, seed=tokens)
    engine = MoEEngine(w13, w2, runtime=runtimes(threads=threads, numa_nodes=numa_nodes))
    x = torch.randn(tokens, hidden).to(weight_dtype)
    ids, weights = random_routing(tokens, experts, k, seed=tokens + 2)
    assert_close(engine.forward(x, ids, weights), reference_moe(w13, w2, x, ids, weights), weight_dtype)


def test_duplicate_expert_in_one_row_counts_twice(runtimes):
    experts, hidden, intermediate, tokens = 4, 32, 16, 12
    w13, w2 = random_experts(experts, hidden, intermediate, torch.float32, seed=8)
    engine = MoEEngine(w13, w2, runtime=runtimes())
    x = torch.randn(tokens, hidden)
    ids = torch.tensor([[1, 1, 2]] * tokens, dtype=torch.int32)
    weights = torch.rand(tokens, 3)
    assert_close(engine.forward(x, ids, weights), reference_moe(w13, w2, x, ids, weights), torch.float32)


@pytest.mark.parametrize("numa_nodes", [2, 3])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 5, 129])
def test_virtual_numa_nodes(runtimes, numa_nodes, threads, tokens):
    # I = 53 gives 4 panels: with 3 nodes the slices are uneven, and with 2 threads on 3
    # nodes one node has no worker of its own.
    experts, hidden, intermediate, k = 7, 70, 53, 3
    w13, w2 = random_experts(experts, hidden, intermediate, torch.bfloat16, seed=numa_nodes)
    runtime = runtimes(threads=threads, numa_nodes=numa_nodes)
    assert runtime.numa_nodes == numa_nodes and runtime.virtual_nodes
    engine = MoEEngine(w13, w2, runtime=runtime)
    x = torch.randn(tokens, hidden, dtype=torch.float32)
    ids, weights = random_routing(tokens, experts, k, seed=tokens)
    assert_close(engine.forward(x, ids, weights), reference_moe(w13, w2, x, ids, weights), torch.float32)


def test_more_virtual_nodes_than_panels(runtimes):
    # I = 16 is one panel: two of three nodes hold no rows and must still give zeros.
    experts, hidden, intermediate, tokens, k = 3, 24, 16, 9, 2
    w13, w2 = random_experts(experts, hidden, intermediate, torch.float32, seed=9)
    engine = MoEEngine(w13, w2, runtime=runtimes(numa_nodes=3))
    x = torch.randn(tokens, hidden)
    ids, weights = random_routing(tokens, experts, k, seed=9)
    assert_close(engine.forward(x, ids, weights), reference_moe(w13, w2, x, ids, weights), torch.float32)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.bfloat16])
def test_activation_and_routing_weight_dtypes(runtimes, x_dtype, gate_dtype):
    experts, hidden, intermediate, tokens, k = 5, 56, 40, 17, 2
    w13, w2 = random_experts(experts, hidden, intermediate, torch.float32, seed=10)
    engine = MoEEngine(w13, w2, runtime=runtimes())
    x = torch.randn(tokens, hidden).to(x_dtype)
    ids, weights = random_routing(tokens, experts, k, seed=10)
    weights = weights.to(gate_dtype)
    out = engine.forward(x, ids, weights)
    assert out.dtype == x_dtype
    assert_close(out, reference_moe(w13, w2, x, ids, weights), x_dtype)


def test_weights_are_copied_and_originals_can_be_freed(runtimes):
    experts, hidden, intermediate, tokens, k = 6, 64, 32, 10, 2
    w13, w2 = random_experts(experts, hidden, intermediate, torch.bfloat16, seed=11)
    reference_w13, reference_w2 = w13.clone(), w2.clone()
    engine = MoEEngine(w13, w2, runtime=runtimes())
    # The engine holds about 1x the weights (panels padded to 16 columns).
    original_bytes = (w13.numel() + w2.numel()) * w13.element_size()
    assert original_bytes <= engine.nbytes <= 1.5 * original_bytes
    w13.fill_(float("nan"))
    w2.fill_(float("nan"))
    del w13, w2
    gc.collect()
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    ids, weights = random_routing(tokens, experts, k, seed=11)
    ref = reference_moe(reference_w13, reference_w2, x, ids, weights)
    assert_close(engine.forward(x, ids, weights), ref, torch.bfloat16)


def test_submit_wait_overlaps_and_keeps_order(runtimes):
    experts, hidden, intermediate, tokens, k = 8, 64, 48, 24, 3
    runtime = runtimes()
    layers = [random_experts(experts, hidden, intermediate, torch.float32, seed=20 + i) for i in range(3)]
    engines = [MoEEngine(w13, w2, runtime=runtime) for w13, w2 in layers]
    x = torch.randn(tokens, hidden)
    ids, weights = random_routing(tokens, experts, k, seed=21)
    pending = [engine.submit(x, ids, weights) for engine in engines]
    side_work = x @ x.T  # the caller is free while the workers run
    outputs = [p.wait() for p in reversed(pending)][::-1]
    assert side_work.shape == (tokens, tokens)
    for (w13, w2), out in zip(layers, outputs):
        assert_close(out, reference_moe(w13, w2, x, ids, weights), torch.float32)
    # wait() twice returns the same tensor
    assert pending[0].wait() is outputs[0]
    assert [engine.forward_calls for engine in engines] == [1, 1, 1]


def test_zero_tokens(runtimes):
    w13, w2 = random_experts(4, 32, 16, torch.float32, seed=12)
    engine = MoEEngine(w13, w2, runtime=runtimes())
    out = engine.forward(torch.empty(0, 32), torch.empty(0, 2, dtype=torch.int32), torch.empty(0, 2))
    assert out.shape == (0, 32)


def test_custom_op_compiles_without_graph_breaks(runtimes):
    experts, hidden, intermediate, tokens, k = 8, 64, 40, 6, 2
    w13, w2 = random_experts(experts, hidden, intermediate, torch.float32, seed=13)
    engine = MoEEngine(w13, w2, runtime=runtimes())

    def layer(x, router_logits):
        weights, ids = torch.topk(torch.softmax(router_logits, dim=-1), k)
        return torch.ops.lvllm.lk_moe_forward(x, ids.to(torch.int32), weights, engine.engine_id) + x

    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(tokens, hidden)
    logits = torch.randn(tokens, experts)
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), k)
    ref = reference_moe(w13, w2, x, ids, weights) + x.double()
    assert_close(compiled(x, logits), ref, torch.float32)
    torch.library.opcheck(torch.ops.lvllm.lk_moe_forward, (x, ids.to(torch.int32), weights, engine.engine_id))


@pytest.fixture(scope="module")
def small_engine():
    w13, w2 = random_experts(4, 32, 16, torch.float32, seed=14)
    runtime = make_runtime(threads=1, binding="NONE", power_saving=True, isa="", numa_nodes=0)
    return MoEEngine(w13, w2, runtime=runtime), (w13, w2)


class TestBadInput:

    def inputs(self, tokens=3, k=2):
        return torch.randn(tokens, 32), torch.zeros(tokens, k, dtype=torch.int32), torch.ones(tokens, k)

    def test_expert_id_out_of_range(self, small_engine):
        engine, (w13, w2) = small_engine
        x, ids, weights = self.inputs()
        ids[2, 1] = 4
        with pytest.raises(IndexError, match=r"topk_ids\[2, 1\] = 4.*0\.\.3"):
            engine.forward(x, ids, weights)
        ids[2, 1] = -2
        with pytest.raises(IndexError, match="-2"):
            engine.forward(x, ids, weights)
        ids[2, 1] = 1  # the engine still works after refusing a request
        assert_close(engine.forward(x, ids, weights), reference_moe(w13, w2, x, ids, weights), torch.float32)

    @pytest.mark.parametrize(
        "mutate, message",
        [
            (lambda x, i, w: (x[:, :31].contiguous(), i, w), r"x must be \[tokens, 32\]"),
            (lambda x, i, w: (x.double(), i, w), "x has dtype torch.float64"),
            (lambda x, i, w: (x, i.to(torch.int16), w), "topk_ids has dtype torch.int16"),
            (lambda x, i, w: (x, i[:2], w), "topk_ids must be"),
            (lambda x, i, w: (x, i, w[:, :1].contiguous()), "topk_weights must have"),
            (lambda x, i, w: (x.T.contiguous().T, i, w), "x must be contiguous"),
            (lambda x, i, w: (x, i.T.contiguous().T, w), "topk_ids must be contiguous"),
            (lambda x, i, w: (x.to("meta"), i, w), "x must be on the CPU"),
        ],
    )
    def test_bad_tensors(self, small_engine, mutate, message):
        with pytest.raises(ValueError, match=message):
            small_engine[0].forward(*mutate(*self.inputs()))

    def test_bad_weights(self):
        runtime = make_runtime(threads=1, binding="NONE", power_saving=True, isa="", numa_nodes=0)
        w13, w2 = random_experts(4, 32, 16, torch.float32, seed=15)
        with pytest.raises(ValueError, match=r"w2 must be \[E, H, I\]"):
            MoEEngine(w13, w2[:, :, :15].contiguous(), runtime=runtime)
        with pytest.raises(ValueError, match="must share a format"):
            MoEEngine(w13, w2.bfloat16(), runtime=runtime)
        with pytest.raises(ValueError, match="activation 'relu'"):
            MoEEngine(w13, w2, activation="relu", runtime=runtime)
        with pytest.raises(ValueError, match="w13 must be contiguous"):
            MoEEngine(w13.transpose(1, 2), w2, runtime=runtime)
        with pytest.raises(ValueError, match="w13 has dtype torch.float64"):
            MoEEngine(w13.double(), w2.double(), runtime=runtime)


class TestEnvironment:
    @pytest.mark.parametrize(
        "name, value",
        [("LK_THREADS", "0"), ("LK_THREADS", "two"), ("LK_THREAD_BINDING", "SOCKET"), ("LK_POWER_SAVING", "maybe"),
         ("LK_ISA", "SSE2"), ("LK_NUMA_NODES", "-1")],
    )
    def test_bad_values_name_the_variable(self, monkeypatch, name, value):
        monkeypatch.setenv(name, value)
        with pytest.raises(envs.EnvError, match=f"{name}={value!r} is not valid: expected"):
            make_runtime()

    def test_lk_isa_takes_the_engine_levels(self):
        # envs.py validates LK_ISA without loading the engine; the two lists must agree.
        assert envs.ISA_NAMES == tuple(ISA_ORDER)

    def test_isa_above_the_cpu_is_refused(self, monkeypatch):
        above = ISA_ORDER[ISA_ORDER.index(_lk.best_isa()) + 1:]
        if not above:
            pytest.skip("this CPU runs every ISA lk has")
        monkeypatch.setenv("LK_ISA", above[0])
        with pytest.raises(envs.EnvError, match=f"LK_ISA='{above[0]}'.*not supported by this CPU"):
            make_runtime()

    def test_environment_configures_the_runtime(self, monkeypatch):
        monkeypatch.setenv("LK_THREADS", "1")
        monkeypatch.setenv("LK_NUMA_NODES", "2")
        monkeypatch.setenv("LK_ISA", "GENERIC")
        monkeypatch.setenv("LK_THREAD_BINDING", "NUMA_NODE")
        monkeypatch.setenv("LK_POWER_SAVING", "1")
        runtime = make_runtime()
        assert (runtime.threads, runtime.numa_nodes, runtime.isa) == (1, 2, "GENERIC")
        assert "power saving" in runtime.describe() and "NUMA_NODE" in runtime.describe()

    def test_more_threads_than_cpus_are_warned_about_once(self, caplog, monkeypatch):
        from lvllm.lk import runtime as lk_runtime

        # Fresh, whatever ran before in this process (on one CPU, other tests oversubscribe too).
        monkeypatch.setattr(lk_runtime, "_oversubscription_warned", set())
        threads = len(os.sched_getaffinity(0)) + 1
        with caplog.at_level(logging.WARNING, logger="lvllm"):
            runtimes = [make_runtime(threads=threads, workers="OPENMP") for _ in range(2)]
        warnings = [r.message for r in caplog.records if "LK_THREADS" in r.message]
        assert len(warnings) == 1 and f"{threads} threads on the {threads - 1} CPU(s)" in warnings[0]
        assert all(r.threads == threads for r in runtimes)

    def test_threads_that_cannot_start_are_named_and_joined(self):
        # A thread stack is 8 MiB of address space: with the process's address space capped
        # just above what it uses, the pool's 40th thread or so cannot be created.
        script = textwrap.dedent("""
            import resource
            from lvllm import envs
            from lvllm.lk import make_runtime
            used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (used + (256 << 20),) * 2)
            try:
                make_runtime(threads=200, workers="OWN", power_saving=True)
            except envs.EnvError as error:
                print("REFUSED", error)
        """)
        environ = {name: value for name, value in os.environ.items() if name != "LK_THREADS"}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env=environ)
        assert done.returncode == 0, done.stderr[-2000:]   # no std::terminate, no crash
        refusal = done.stdout.partition("REFUSED ")[2]
        # The threads asked for, the variable that sets them, its value now and what it takes.
        assert "200 worker threads" in refusal, done.stdout
        assert re.search(r"\bLK_THREADS\b.*\bunset\b", refusal), done.stdout
        assert envs.VARIABLES["LK_THREADS"].valid in refusal, done.stdout

    def test_unknown_variable_is_reported(self, monkeypatch):
        monkeypatch.setenv("LK_THREDS", "2")
        with pytest.raises(envs.EnvError, match="unknown lvllm variable.*LK_THREDS"):
            envs.validate_all()


def test_restricted_cpuset_is_respected():
    # As in a container limited to one CPU: the default runtime uses only that CPU.
    import subprocess
    import sys

    allowed = max(os.sched_getaffinity(0))
    script = (
        "import os, torch; os.sched_setaffinity(0, {%d});"
        "from lvllm.lk import make_runtime, MoEEngine; r = make_runtime();"
        "print(r.threads, r.numa_nodes, r.describe());"
        "w13 = torch.randn(2, 8, 16); w2 = torch.randn(2, 16, 4);"
        "e = MoEEngine(w13, w2, runtime=r);"
        "print(float(e.forward(torch.randn(3, 16), torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, 1)).abs().sum()) > 0)"
        % allowed
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LK_")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    threads, nodes, *description = result.stdout.splitlines()[0].split(" ", 2)
    assert (threads, nodes) == ("1", "1")
    assert f"cpus [{allowed}]" in description[0]
    assert result.stdout.splitlines()[1] == "True"
