"""LVLLM_CPU_SERIAL_ONE_ITERATION: inductor's kernels, compiled as vLLM's CPU build compiles them,
get an OpenMP `if` on their regions and give inductor's own bits at one row and at many; regions
the rewrite cannot bound are left as they were. (A whole model with it: test_equivalence.)"""

from __future__ import annotations

import re
from unittest.mock import patch

import pytest
import torch
from torch._inductor.codegen import cpp as inductor_cpp
from torch._dynamo.utils import counters

from lvllm.settings import Settings
from lvllm.vllm import inductor_openmp
from lvllm.vllm.installation import Installation

# vLLM's CPU platform compiles with dynamic threads; two threads so that inductor shares loops; no
# cache, so that each compile generates its kernels.
OPTIONS = {"cpp.dynamic_threads": True, "cpp.threads": 2, "fx_graph_cache": False}


def layer_tail(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor):
    """Residual add, RMSNorm and a reduction over the rows: the kinds of kernels a layer has."""
    hidden = (x.float() + residual.float())
    normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.float()
    return normed.to(x.dtype), hidden.to(x.dtype), hidden.sum(0)


def compiled_run(rows_list: list[int]):
    """Each row count's outputs from one graph of any row count (as vLLM's serves one token with the
    graph its warm-up compiled), and its kernels' source as the code generation in place wrote it."""
    torch._dynamo.reset()
    counters.clear()
    sources = []
    generate = inductor_cpp.KernelGroup.codegen_group

    def recorded(group, *args, **kwargs):
        sources.append(generate(group, *args, **kwargs))
        return sources[-1]

    compiled = torch.compile(layer_tail, dynamic=True, options=OPTIONS)
    generator = torch.Generator().manual_seed(0)
    outputs = []
    with patch.object(inductor_cpp.KernelGroup, "codegen_group", recorded):
        for rows in rows_list:
            x, residual = (torch.randn(rows, 512, generator=generator).to(torch.bfloat16) for _ in range(2))
            weight = torch.randn(512, generator=generator).to(torch.bfloat16)
            for tensor in (x, residual):   # no 0/1 specialisation: one graph for every row count
                torch._dynamo.decorators.mark_unbacked(tensor, 0)
            outputs.append(compiled(x, residual, weight))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters)   # the one-row calls ran the dynamic kernels
    return outputs, "\n".join(sources)


def test_compiled_kernels_get_the_clause_and_give_inductors_bits():
    rows_list = [37, 1, 2, 1]
    inductor_openmp.uninstall()
    expected, inductor_source = compiled_run(rows_list)
    generate = inductor_cpp.KernelGroup.codegen_group
    inductor_openmp.install(Installation(Settings()))
    try:
        assert torch.compiler.config.cache_key_tag.split(",")[-1] == inductor_openmp.CACHE_TAG
        outputs, source = compiled_run(rows_list)
    finally:
        inductor_openmp.uninstall()
    assert inductor_cpp.KernelGroup.codegen_group is generate
    assert inductor_openmp.CACHE_TAG not in torch.compiler.config.cache_key_tag
    regions = source.count("#pragma omp parallel")
    assert regions > 0 and source.count("#pragma omp parallel if(") == regions
    assert "#pragma omp parallel if(" not in inductor_source
    for got, want in zip(outputs, expected):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_setting_off_leaves_inductor_alone():
    generate = inductor_openmp.uninstall()
    inductor_openmp.install(Installation(Settings(serial_one_iteration=False)))
    assert inductor_cpp.KernelGroup.codegen_group is generate
    assert inductor_openmp.CACHE_TAG not in torch.compiler.config.cache_key_tag


KERNEL = """extern "C"  void kernel(const bfloat16* in_ptr0, bfloat16* out_ptr0, const int64_t ks0, const int64_t ks1)
{
    #pragma omp parallel
    {
        int tid = omp_get_thread_num();
        {
            #pragma omp for collapse(2)
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(ks0); x0+=static_cast<int64_t>(1L))
            {
                for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(16L); x1+=static_cast<int64_t>(16L))
                {
                    out_ptr0[x0] = in_ptr0[x1];
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(4L); x0<static_cast<int64_t>(2L*ks1); x0+=static_cast<int64_t>(2L))
            {
                out_ptr0[x0] = in_ptr0[x0];
            }
        }
    }
}"""


@pytest.mark.parametrize("ks0, ks1, parallel", [(1, 1, False), (1, 3, False), (2, 1, True), (1, 4, True),
                                                 (0, 0, False)])
def test_condition_counts_every_shared_loop(ks0, ks1, parallel):
    """Two iterations of any shared loop open the region (a collapsed nest: of any of its levels)."""
    rewritten = inductor_openmp.serial_one_iteration(KERNEL)
    pragma = next(line for line in rewritten.split("\n") if "omp parallel" in line)
    condition = pragma.split(" if(", 1)[1][:-1]
    python = re.sub(r"(\d+)L\b", r"\1", condition.replace("static_cast<int64_t>", "").replace("||", " or "))
    assert eval(python, {"ks0": ks0, "ks1": ks1}) is parallel


@pytest.mark.parametrize("change", [
    ("x0<static_cast<int64_t>(ks0)", "x0<static_cast<int64_t>(rows)"),   # bound not an argument
    ("#pragma omp for\n            for(int64_t x0=static_cast<int64_t>(4L)",     # work split by hand
     "\n            for(int64_t x0=static_cast<int64_t>(4L) + 2L*tid"),
    ("out_ptr0[x0] = in_ptr0[x0];", "out_ptr0[x0] = omp_get_num_threads();"),
    ("#pragma omp parallel\n    {", "#pragma omp parallel\n    int tid = 0; {"),   # no block after it
])
def test_regions_it_cannot_bound_stay(change):
    kernel = KERNEL.replace(*change)
    assert kernel != KERNEL
    assert inductor_openmp.serial_one_iteration(kernel) == kernel
