// Thin pybind11 layer: tensors arrive as data pointers plus dtype codes checked by the
// Python wrapper (lvllm/lk), so the extension does not link against torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "lk/bench/kernel_rate.h"
#include "lk/bench/roofline.h"
#include "lk/c_api.h"
#include "lk/cpu_features.h"
#include "lk/cuda/driver.h"
#include "lk/cuda/stream_forward.h"
#include "lk/linear_engine.h"
#include "lk/moe_engine.h"
#include "lk/runtime.h"

namespace py = pybind11;

namespace {

lk::DType to_dtype(int code, const char* what) {
  if (code < 0 || code >= lk::kNumDTypes) {
    throw std::invalid_argument(std::string(what) + ": unknown dtype code " + std::to_string(code));
  }
  return static_cast<lk::DType>(code);
}

lk::ThreadBinding to_binding(const std::string& name) {
  if (name == "CPU_CORE") return lk::ThreadBinding::CpuCore;
  if (name == "NUMA_NODE") return lk::ThreadBinding::NumaNode;
  if (name == "NONE") return lk::ThreadBinding::None;
  throw std::invalid_argument("thread binding '" + name + "': valid are CPU_CORE, NUMA_NODE, NONE");
}

lk::Workers to_workers(const std::string& name) {
  if (name == "OWN") return lk::Workers::OwnPool;
  if (name == "OPENMP") return lk::Workers::OpenMpTeam;
  throw std::invalid_argument("workers '" + name + "': valid are OWN, OPENMP");
}

const void* as_pointer(std::uintptr_t address) { return reinterpret_cast<const void*>(address); }

lk::WeightFormat to_format(int code) {
  if (code < 0 || code >= lk::kNumWeightFormats) {
    throw std::invalid_argument("unknown weight format code " + std::to_string(code));
  }
  return static_cast<lk::WeightFormat>(code);
}

// (values, format code, scales, offsets, group): a source matrix as data pointers.
using WeightArgs = std::tuple<std::uintptr_t, int, std::uintptr_t, std::uintptr_t, int>;

lk::ExpertShape to_shape(int experts, int hidden, int intermediate, int format, int group_size) {
  lk::ExpertShape shape;
  shape.experts = experts;
  shape.hidden = hidden;
  shape.intermediate = intermediate;
  shape.format = to_format(format);
  shape.group_size = group_size;
  return shape;
}

lk::WeightSource to_source(const WeightArgs& args) {
  lk::WeightSource source;
  source.values = as_pointer(std::get<0>(args));
  source.format = to_format(std::get<1>(args));
  // The e2m1 formats' scales are bytes; NVFP4's row scales come where offsets would.
  if (lk::is_e2m1(source.format)) {
    source.scale_bytes = static_cast<const uint8_t*>(as_pointer(std::get<2>(args)));
  } else {
    source.scales = static_cast<const float*>(as_pointer(std::get<2>(args)));
  }
  if (source.format == lk::WeightFormat::Nvfp4) {
    source.row_scales = static_cast<const float*>(as_pointer(std::get<3>(args)));
  } else {
    source.offsets = static_cast<const float*>(as_pointer(std::get<3>(args)));
  }
  source.group = std::get<4>(args);
  return source;
}

void bind_formats(py::module_& m) {
  m.def("format_names", [] {
    std::vector<std::string> names;
    for (int code = 0; code < lk::kNumWeightFormats; ++code) names.push_back(lk::format_name(static_cast<lk::WeightFormat>(code)));
    return names;
  }, "Weight format names, indexed by format code.");

  m.def("planned_weight_bytes",
        [](int experts, int hidden, int intermediate, int format, int group_size, int nodes) {
          if (experts < 1 || hidden < 1 || intermediate < 1 || nodes < 1) {
            throw std::invalid_argument("experts, hidden, intermediate and nodes must be >= 1");
          }
          return lk::planned_weight_bytes(to_shape(experts, hidden, intermediate, format, group_size), nodes);
        },
        py::arg("experts"), py::arg("hidden"), py::arg("intermediate"), py::arg("format"), py::arg("group_size"),
        py::arg("nodes"), "Bytes an engine of that shape holds over `nodes` NUMA nodes, before it exists.");

  m.def("planned_linear_bytes",
        [](int outputs, int inputs, int format, int group_size) {
          if (outputs < 1 || inputs < 1) throw std::invalid_argument("outputs and inputs must be >= 1");
          return lk::LinearEngine::planned_bytes(outputs, inputs, to_format(format), group_size);
        },
        py::arg("outputs"), py::arg("inputs"), py::arg("format"), py::arg("group_size"),
        "Bytes a linear engine of that shape holds, before it exists.");

  m.def("c_api_address", [] { return reinterpret_cast<std::uintptr_t>(&lk::c_api()); },
        "Address of lk's C entry points (lk/c_api.h), for lk's torch ops in another library.");
  m.def("best_isa", [] { return std::string(lk::isa_name(lk::detect_best_isa())); },
        "Highest kernel ISA this CPU and OS support.");
  m.def("isa_names", [] {
        std::vector<std::string> names;
        for (lk::Isa isa : lk::kIsaLevels) names.emplace_back(lk::isa_name(isa));
        return names;
      },
      "Every kernel ISA level, lowest first: each implies the ones before it.");
}

// Measurements for the benchmarks: the machine's ceilings and single kernels' rates.
void bind_benchmarks(py::module_& m) {
  m.def("measure_read_bandwidth_gbs", &lk::bench::measure_read_bandwidth_gbs, py::arg("threads"),
        py::arg("bytes_per_thread"), py::arg("reps") = 10, py::call_guard<py::gil_scoped_release>(),
        "Read bandwidth of this machine in GB/s with `threads` pinned threads (benchmarks' ceiling).");
  m.def("measure_fma_peak_gflops", &lk::bench::measure_fma_peak_gflops, py::arg("threads"),
        py::call_guard<py::gil_scoped_release>(), "fp32 FMA peak in GFLOP/s with `threads` threads.");

  m.def("measure_kernel_ns_per_panel_row", &lk::bench::kernel_ns_per_panel_row, py::arg("isa"), py::arg("format"),
        py::arg("rows"), py::arg("depth"), py::arg("pair") = false, py::arg("seconds") = 0.2,
        py::arg("bf16_inputs") = false,
        py::call_guard<py::gil_scoped_release>(),
        "ns per panel row of one panel kernel on the calling thread, panel in cache (benchmarks).");
  m.def("kernel_panel_bytes", &lk::bench::kernel_panel_bytes, py::arg("format"), py::arg("depth"),
        "Bytes of the panel measure_kernel_ns_per_panel_row multiplies (values, scales, offsets).");
  m.def("kernel_chunk_rows", &lk::bench::kernel_chunk_rows, py::arg("isa"), py::arg("format"),
        "Most rows measure_kernel_ns_per_panel_row takes for `format` on `isa` (the engine's chunk).");
  m.def("kernel_reads_two_panels", &lk::bench::kernel_reads_two_panels, py::arg("isa"), py::arg("format"),
        py::arg("rows"), "Whether the kernels read an expert's gate and up side by side for `rows` rows.");
}

void bind_runtime(py::module_& m) {
  py::class_<lk::Runtime, std::shared_ptr<lk::Runtime>>(m, "Runtime")
      .def(py::init([](int threads, const std::string& binding, bool power_saving, const std::string& isa,
                       int virtual_nodes, const std::string& workers) {
             lk::RuntimeOptions options;
             options.threads = threads;
             options.workers = to_workers(workers);
             options.binding = to_binding(binding);
             options.power_saving = power_saving;
             options.isa = isa;
             options.virtual_nodes = virtual_nodes;
             return std::make_shared<lk::Runtime>(options);
           }),
           py::arg("threads"), py::arg("binding"), py::arg("power_saving"), py::arg("isa"),
           py::arg("virtual_nodes"), py::arg("workers") = "OWN")
      .def_property_readonly("isa", [](const lk::Runtime& r) { return std::string(lk::isa_name(r.isa())); })
      .def_property_readonly("threads", [](lk::Runtime& r) { return r.executor().num_threads(); })
      .def_property_readonly("workers", [](const lk::Runtime& r) {
        return std::string(r.workers() == lk::Workers::OpenMpTeam ? "OPENMP" : "OWN");
      })
      .def_property_readonly("numa_nodes", [](const lk::Runtime& r) { return r.topology().num_nodes(); })
      .def_property_readonly("cpus", [](const lk::Runtime& r) {
        std::vector<int> cpus;
        for (const auto& node : r.topology().node_cpus) cpus.insert(cpus.end(), node.begin(), node.end());
        std::sort(cpus.begin(), cpus.end());
        return cpus;
      }, "The CPUs the runtime's topology holds, ascending.")
      .def_property_readonly("virtual_nodes", [](const lk::Runtime& r) { return r.topology().virtual_nodes; })
      .def("describe", &lk::Runtime::describe);
}

void bind_moe_engine(py::module_& m) {
  py::class_<lk::MoEEngine>(m, "Engine")
      .def(py::init([](std::shared_ptr<lk::Runtime> runtime, const WeightArgs& w13, const WeightArgs& w2, int experts,
                       int hidden, int intermediate, int format, int group_size, int activation, float swiglu_alpha,
                       float swiglu_limit, std::uintptr_t w13_bias, std::uintptr_t w2_bias) {
             if (activation < 0 || activation >= lk::kNumActivations) throw std::invalid_argument("unknown activation code");
             lk::ExpertShape shape = to_shape(experts, hidden, intermediate, format, group_size);
             shape.activation = static_cast<lk::Activation>(activation);
             shape.swiglu_alpha = swiglu_alpha;
             shape.swiglu_limit = swiglu_limit;
             const lk::WeightSource w13_source = to_source(w13), w2_source = to_source(w2);
             const lk::ExpertBiases biases{reinterpret_cast<const float*>(w13_bias),
                                           reinterpret_cast<const float*>(w2_bias)};
             py::gil_scoped_release release;
             return std::make_unique<lk::MoEEngine>(std::move(runtime), w13_source, w2_source, shape, biases);
           }),
           py::arg("runtime"), py::arg("w13"), py::arg("w2"), py::arg("experts"), py::arg("hidden"),
           py::arg("intermediate"), py::arg("format"), py::arg("group_size"), py::arg("activation"),
           py::arg("swiglu_alpha"), py::arg("swiglu_limit"), py::arg("w13_bias") = 0, py::arg("w2_bias") = 0)
      .def(
          "submit",
          [](lk::MoEEngine& engine, std::uintptr_t input, int input_dtype, int tokens, std::uintptr_t topk_ids,
             bool ids_are_int64, int topk, std::uintptr_t topk_weights, int weights_dtype, std::uintptr_t output,
             int output_dtype) {
            lk::ForwardArgs args;
            args.input = as_pointer(input);
            args.input_dtype = to_dtype(input_dtype, "hidden states");
            args.tokens = tokens;
            args.topk_ids = as_pointer(topk_ids);
            args.ids_are_int64 = ids_are_int64;
            args.topk = topk;
            args.topk_weights = as_pointer(topk_weights);
            args.weights_dtype = to_dtype(weights_dtype, "topk_weights");
            args.output = reinterpret_cast<void*>(output);
            args.output_dtype = to_dtype(output_dtype, "output");
            py::gil_scoped_release release;
            return engine.submit(args);
          },
          py::arg("input"), py::arg("input_dtype"), py::arg("tokens"), py::arg("topk_ids"), py::arg("ids_are_int64"),
          py::arg("topk"), py::arg("topk_weights"), py::arg("weights_dtype"), py::arg("output"),
          py::arg("output_dtype"))
      .def("wait", &lk::MoEEngine::wait, py::arg("ticket"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("weight_bytes", &lk::MoEEngine::weight_bytes)
      .def_property_readonly("forward_calls", &lk::MoEEngine::forward_calls)
      .def_property_readonly("address", [](lk::MoEEngine& engine) { return reinterpret_cast<std::uintptr_t>(&engine); },
                             "The engine's address, for lk's C entry points (c_api_address).")
      .def_property_readonly("hidden_panels", &lk::MoEEngine::hidden_panels)
      .def(
          "packed_slices",
          [](py::object self) {
            // Writable views of the engine's own memory; each keeps the engine alive.
            const auto& engine = self.cast<const lk::MoEEngine&>();
            const auto view = [&self](const lk::HostBuffer& buffer) {
              py::memoryview memory = py::memoryview::from_memory(buffer.data(), static_cast<py::ssize_t>(buffer.size()));
              py::module_::import("weakref").attr("finalize")(memory, py::cpp_function([self] {}));
              return memory;
            };
            py::list slices;
            for (const auto& slice : engine.packed_slices()) {
              py::dict entry;
              entry["begin"] = slice.begin;
              entry["length"] = slice.length;
              entry["panels"] = slice.panels;
              entry["gate_up"] = view(slice.gate_up);
              entry["down"] = view(slice.down);
              entry["gate_up_panel_bytes"] = slice.gate_up_panel_bytes;
              entry["down_panel_bytes"] = slice.down_panel_bytes;
              slices.append(entry);
            }
            return slices;
          },
          "Per NUMA node: the rows of I it holds and views of its packed weight memory.");
}

void bind_linear_engine(py::module_& m) {
  py::class_<lk::LinearEngine>(m, "LinearEngine")
      .def(py::init([](std::shared_ptr<lk::Runtime> runtime, const WeightArgs& weight, int outputs, int inputs,
                       int format, int group_size) {
             const lk::WeightSource source = to_source(weight);
             const lk::WeightFormat stored = to_format(format);
             py::gil_scoped_release release;
             return std::make_unique<lk::LinearEngine>(std::move(runtime), source, outputs, inputs, stored, group_size);
           }),
           py::arg("runtime"), py::arg("weight"), py::arg("outputs"), py::arg("inputs"), py::arg("format"),
           py::arg("group_size"))
      .def(
          "forward",
          [](lk::LinearEngine& engine, std::uintptr_t input, int input_dtype, int rows, std::uintptr_t bias,
             int bias_dtype, std::uintptr_t output, int output_dtype) {
            lk::LinearArgs args;
            args.input = as_pointer(input);
            args.input_dtype = to_dtype(input_dtype, "input");
            args.rows = rows;
            args.bias = as_pointer(bias);
            args.bias_dtype = to_dtype(bias_dtype, "bias");
            args.output = reinterpret_cast<void*>(output);
            args.output_dtype = to_dtype(output_dtype, "output");
            py::gil_scoped_release release;
            engine.wait(engine.submit(args));
          },
          "Runs the layer and waits for it.", py::arg("input"), py::arg("input_dtype"), py::arg("rows"),
          py::arg("bias"), py::arg("bias_dtype"), py::arg("output"), py::arg("output_dtype"))
      .def_property_readonly("weight_bytes", &lk::LinearEngine::weight_bytes)
      .def_property_readonly("forward_calls", &lk::LinearEngine::forward_calls)
      .def_property_readonly("address", [](lk::LinearEngine& engine) { return reinterpret_cast<std::uintptr_t>(&engine); },
                             "The engine's address, for lk's C entry points (c_api_address).");
}

void bind_cuda(py::module_& m) {
  py::class_<lk::cuda::Driver, std::shared_ptr<lk::cuda::Driver>>(m, "CudaDriver")
      .def(py::init<const std::string&>(), py::arg("library"))
      .def_property_readonly("library", &lk::cuda::Driver::library);

  py::class_<lk::cuda::HostStaging>(m, "HostStaging")
      .def(py::init([](std::uintptr_t input, std::uintptr_t topk_ids, std::uintptr_t topk_weights, std::uintptr_t padding,
                       std::uintptr_t output, std::size_t io_bytes, std::size_t topk_bytes, std::size_t padding_bytes) {
             lk::cuda::HostStaging staging;
             staging.input = reinterpret_cast<void*>(input);
             staging.topk_ids = reinterpret_cast<int32_t*>(topk_ids);
             staging.topk_weights = reinterpret_cast<float*>(topk_weights);
             staging.padding = reinterpret_cast<uint8_t*>(padding);
             staging.output = reinterpret_cast<void*>(output);
             staging.input_bytes = staging.output_bytes = io_bytes;
             staging.topk_bytes = topk_bytes;
             staging.padding_bytes = padding_bytes;
             return staging;
           }),
           py::arg("input"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("padding"), py::arg("output"),
           py::arg("io_bytes"), py::arg("topk_bytes"), py::arg("padding_bytes"));

  py::class_<lk::cuda::StreamedForwards>(m, "StreamedForwards")
      .def(py::init([](std::shared_ptr<lk::cuda::Driver> driver) {
             return std::make_unique<lk::cuda::StreamedForwards>(std::move(driver));
           }),
           py::arg("driver"))
      .def(
          "begin",
          [](lk::cuda::StreamedForwards& self, std::uintptr_t stream, lk::MoEEngine& engine, std::uintptr_t input,
             int input_dtype, int tokens, std::uintptr_t topk_ids, std::uintptr_t topk_weights, int topk,
             std::uintptr_t padding, const lk::cuda::HostStaging& staging, bool replayable) {
            lk::cuda::DeviceForward forward;
            forward.input = input;
            forward.input_dtype = to_dtype(input_dtype, "hidden states");
            forward.tokens = tokens;
            forward.topk_ids = topk_ids;
            forward.topk_weights = topk_weights;
            forward.topk = topk;
            forward.padding = padding;
            return self.begin(reinterpret_cast<lk::cuda::Stream>(stream), engine, forward, staging, replayable);
          },
          // The records point at the engine: it lives as long as this object.
          py::keep_alive<1, 3>(), py::arg("stream"), py::arg("engine"), py::arg("input"), py::arg("input_dtype"),
          py::arg("tokens"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("topk"), py::arg("padding"),
          py::arg("staging"), py::arg("replayable"))
      .def(
          "finish",
          [](lk::cuda::StreamedForwards& self, std::uintptr_t stream, std::uintptr_t handle, std::uintptr_t output) {
            self.finish(reinterpret_cast<lk::cuda::Stream>(stream), handle, output);
          },
          py::arg("stream"), py::arg("handle"), py::arg("output"))
      .def("take_error", &lk::cuda::StreamedForwards::take_error)
      .def_property_readonly("records", &lk::cuda::StreamedForwards::records);
}

}  // namespace

PYBIND11_MODULE(_lk, m) {
  m.doc() = "lk: routed MoE experts on the CPU";
  bind_formats(m);
  bind_benchmarks(m);
  bind_runtime(m);
  bind_moe_engine(m);
  bind_linear_engine(m);
  bind_cuda(m);
}
