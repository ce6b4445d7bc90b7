"""lvllm.hybrid (vLLM-agnostic layer logic) and lvllm.plugin, without starting vLLM."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lvllm import envs
from lvllm.hybrid import (
    RESIDENT_VAR,
    Placement,
    check_resident_layers,
    format_layers,
)

HAVE_LK = importlib.util.find_spec("lvllm._lk") is not None
needs_lk = pytest.mark.skipif(not HAVE_LK, reason="lk engine not built")


@pytest.mark.parametrize("spec, layers", [
    ("", set()),
    ("0-2", {0, 1, 2}),
    ("0,1,8-9", {0, 1, 8, 9}),
    (" 3 , 5-5 ", {3, 5}),
])
def test_resident_spec_parses(monkeypatch, spec, layers):
    monkeypatch.setenv(RESIDENT_VAR, spec)
    assert envs.get(RESIDENT_VAR) == layers
    assert Placement.from_env().resident == layers


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
    runtime = {"threads": 2, "numa_nodes": 1, "isa": "AVX2"}
    assert placement.loaded(0, 2**29, "bf16", runtime) is None
    assert placement.loaded(2, 2**29, "bf16", runtime) is None
    line = placement.loaded(3, 2**30, "bf16", runtime)
    assert line == (
        "lvllm: 3 MoE layer(s) on lk [0,2-3] (bf16, 2.000 GiB in RAM, 2 threads, "
        "1 NUMA node(s), ISA AVX2); 1 on the device [1]; "
        f"{RESIDENT_VAR} also names non-MoE layer(s) 6"
    )
    assert placement.loaded(3, 2**30, "bf16", runtime) is None  # logged once


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
def test_unsupported_activation_is_refused():
    from lvllm.hybrid import HybridExperts, UnsupportedLayer

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


def test_install_registers_once_and_refuses_a_rival(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.model_executor.custom_op import op_registry_oot

    from lvllm import vllm_adapter

    monkeypatch.setenv("LVLLM_MOE_NUMA_ENABLED", "1")
    saved = dict(op_registry_oot)
    try:
        for name in ("RoutedExperts", "MoERunner"):
            op_registry_oot.pop(name, None)
        vllm_adapter.install()
        vllm_adapter.install()  # idempotent: vLLM may load plugins more than once
        assert op_registry_oot["RoutedExperts"] is vllm_adapter.LkRoutedExperts
        assert op_registry_oot["MoERunner"] is vllm_adapter.LkMoERunner
        op_registry_oot["RoutedExperts"] = object
        with pytest.raises(RuntimeError, match="another vLLM plugin"):
            vllm_adapter.install()
    finally:
        op_registry_oot.clear()
        op_registry_oot.update(saved)


def test_install_refuses_unimplemented_weight_format(monkeypatch):
    pytest.importorskip("vllm")
    from lvllm import vllm_adapter

    monkeypatch.setenv("LVLLM_MOE_USE_WEIGHT", "INT4")
    monkeypatch.setattr(vllm_adapter, "op_registry_oot", {})
    with pytest.raises(envs.EnvError, match="LVLLM_MOE_USE_WEIGHT=INT4"):
        vllm_adapter.install()
