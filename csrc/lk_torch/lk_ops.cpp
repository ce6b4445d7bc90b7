// lk's two torch ops, lvllm::lk_moe_forward and lvllm::lk_linear, with C++ kernels.
//
// A compiled step's C++ wrapper calls them through the dispatcher three times a layer; their
// Python kernels (lvllm/lk) cost ~9 us a call there, most of it entering Python. These kernels
// check the arguments as the Python ones do and run the engines through lk's C entry points
// (lk/c_api.h). Engines are found by the ids the ops carry: lvllm/lk/native_ops.py mirrors the
// live ones here while the kernels are installed. Nothing here knows vLLM.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "lk/c_api.h"
#include "lk_torch/boxed_method.h"

namespace lk_torch {

struct MoEEntry {
  lk::MoEEngine* engine;
  int64_t hidden;
};

struct LinearEntry {
  lk::LinearEngine* engine;
  int64_t inputs, outputs;
};

// Live engines of one kind by the id their op carries, and the forwards run through them.
template <class Entry>
struct Engines {
  // Engines come and go from Python (a finalizer may run on any thread) while kernels look up.
  mutable std::mutex mutex;
  std::unordered_map<int64_t, Entry> live;
  int64_t* totals;  // {forwards, their ns}, in the table's totals tensor

  void add(int64_t engine_id, Entry entry) {
    std::lock_guard<std::mutex> lock(mutex);
    live[engine_id] = entry;
  }

  void remove(int64_t engine_id) {
    std::lock_guard<std::mutex> lock(mutex);
    live.erase(engine_id);
  }

  Entry find(int64_t engine_id, const char* kind) const {
    std::lock_guard<std::mutex> lock(mutex);
    const auto found = live.find(engine_id);
    TORCH_CHECK_VALUE(found != live.end(), "no live ", kind, " with id ", engine_id);
    return found->second;
  }

  // Runs one forward through lk's entry point, timed.
  template <class Engine, class Args>
  void run(lk::CApiStatus (*forward)(Engine*, const Args*, char*, std::size_t), Engine* engine,
           const Args& args) {
    std::array<char, 512> error{};
    const auto start = std::chrono::steady_clock::now();
    const lk::CApiStatus status = forward(engine, &args, error.data(), error.size());
    totals[1] += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
    TORCH_CHECK_VALUE(status != lk::CApiStatus::InvalidArgument, error.data());
    TORCH_CHECK_INDEX(status != lk::CApiStatus::OutOfRange, error.data());
    TORCH_CHECK(status == lk::CApiStatus::Ok, error.data());
    ++totals[0];
  }
};

constexpr size_t kMoEArgs = 4;     // x, topk_ids, topk_weights, engine_id
constexpr size_t kLinearArgs = 4;  // x, bias, engine_id, outputs

lk::DType dtype_code(const at::Tensor& tensor, const char* name) {
  switch (tensor.scalar_type()) {
    case at::kFloat: return lk::DType::F32;
    case at::kHalf: return lk::DType::F16;
    case at::kBFloat16: return lk::DType::BF16;
    default:
      TORCH_CHECK_VALUE(false, name, " has dtype ", tensor.scalar_type(),
                        "; supported: float32, float16, bfloat16");
  }
}

// What the Python kernels' .contiguous() and checks make of an argument.
at::Tensor cpu_contiguous(const c10::IValue& value, const char* name) {
  TORCH_CHECK_VALUE(value.isTensor(), name, " must be a tensor");
  const at::Tensor& tensor = value.toTensor();
  TORCH_CHECK_VALUE(tensor.device().is_cpu(), name, " must be on the CPU, got device ", tensor.device());
  return tensor.contiguous();
}

class LkOps : public torch::CustomClassHolder {
 public:
  explicit LkOps(int64_t api_address)
      : api_(reinterpret_cast<const lk::CApi*>(api_address)),
        totals_(at::zeros({4}, at::kLong)),
        moe_{{}, {}, totals_.data_ptr<int64_t>()},
        linear_{{}, {}, totals_.data_ptr<int64_t>() + 2} {
    TORCH_CHECK(api_ != nullptr && api_->version == lk::kCApiVersion && api_->size == sizeof(lk::CApi),
                "lvllm._lk's C entry points are another version than lvllm/_torch_ops' (",
                api_ == nullptr ? 0 : api_->version, " against ", lk::kCApiVersion,
                "): rebuild both (make build)");
  }

  void add_moe(int64_t engine_id, int64_t address, int64_t hidden) {
    moe_.add(engine_id, MoEEntry{reinterpret_cast<lk::MoEEngine*>(address), hidden});
  }
  void add_linear(int64_t engine_id, int64_t address, int64_t inputs, int64_t outputs) {
    linear_.add(engine_id, LinearEntry{reinterpret_cast<lk::LinearEngine*>(address), inputs, outputs});
  }
  void remove_moe(int64_t engine_id) { moe_.remove(engine_id); }
  void remove_linear(int64_t engine_id) { linear_.remove(engine_id); }

  // Puts these kernels in front of the Python ones for the CPU key; uninstall (or the table's
  // end) puts the Python ones back.
  void install() {
    TORCH_CHECK(!library_, "lk's op kernels are already installed");
    library_ = std::make_unique<torch::Library>(torch::Library::IMPL, "lvllm", c10::DispatchKey::CPU,
                                                __FILE__, __LINE__);
    library_->impl("lk_moe_forward", boxed_method<&LkOps::moe_forward>(this));
    library_->impl("lk_linear", boxed_method<&LkOps::linear>(this));
  }
  void uninstall() { library_.reset(); }

  // {MoE forwards, their ns, dense forwards, their ns}, updated in place: the engines' share of a
  // step, timed here because no Python sees these calls (benchmarks/bench_step.py reads it).
  at::Tensor totals() const { return totals_; }

 private:
  void moe_forward(torch::jit::Stack* stack) {
    auto args = torch::jit::last(*stack, kMoEArgs);
    const MoEEntry entry = moe_.find(args[3].toInt(), "lk engine");
    const at::Tensor x = cpu_contiguous(args[0], "x");
    const at::Tensor ids = cpu_contiguous(args[1], "topk_ids");
    const at::Tensor weights = cpu_contiguous(args[2], "topk_weights");
    TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == entry.hidden, "x must be [tokens, ", entry.hidden,
                      "], got shape ", x.sizes());
    const int64_t tokens = x.size(0);
    TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == tokens && ids.size(1) >= 1, "topk_ids must be [",
                      tokens, ", k] with k >= 1, got shape ", ids.sizes());
    TORCH_CHECK_VALUE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, "topk_ids has dtype ",
                      ids.scalar_type(), "; supported: int32, int64");
    TORCH_CHECK_VALUE(weights.sizes() == ids.sizes(), "topk_weights must have topk_ids' shape ", ids.sizes(),
                      ", got ", weights.sizes());
    at::Tensor out = at::empty_like(x);
    lk::ForwardArgs forward;
    forward.input = x.data_ptr();
    forward.input_dtype = dtype_code(x, "x");
    forward.tokens = static_cast<int>(tokens);
    forward.topk_ids = ids.data_ptr();
    forward.ids_are_int64 = ids.scalar_type() == at::kLong;
    forward.topk = static_cast<int>(ids.size(1));
    forward.topk_weights = weights.data_ptr();
    forward.weights_dtype = dtype_code(weights, "topk_weights");
    forward.output = out.data_ptr();
    forward.output_dtype = forward.input_dtype;
    moe_.run(api_->moe_forward, entry.engine, forward);
    torch::jit::drop(*stack, kMoEArgs);
    stack->emplace_back(std::move(out));
  }

  void linear(torch::jit::Stack* stack) {
    auto args = torch::jit::last(*stack, kLinearArgs);
    const int64_t engine_id = args[2].toInt();
    const LinearEntry entry = linear_.find(engine_id, "lk linear engine");
    TORCH_CHECK_VALUE(args[3].toInt() == entry.outputs, "lk linear engine ", engine_id, " has ", entry.outputs,
                      " outputs, the call says ", args[3].toInt());
    TORCH_CHECK_VALUE(args[0].isTensor(), "x must be a tensor");
    const at::Tensor& x = args[0].toTensor();
    TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == entry.inputs, "x must be [..., ", entry.inputs,
                      "], got shape ", x.sizes());
    const at::Tensor rows = cpu_contiguous(x.reshape({-1, entry.inputs}), "x");
    lk::LinearArgs forward;
    forward.input = rows.data_ptr();
    forward.input_dtype = dtype_code(rows, "x");
    forward.rows = static_cast<int>(rows.size(0));
    at::Tensor bias;
    if (!args[1].isNone()) {
      bias = cpu_contiguous(args[1], "bias");
      TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == entry.outputs, "bias must be [", entry.outputs,
                        "], got shape ", bias.sizes());
      forward.bias = bias.data_ptr();
      forward.bias_dtype = dtype_code(bias, "bias");
    }
    at::Tensor out = at::empty({rows.size(0), entry.outputs}, rows.options());
    forward.output = out.data_ptr();
    forward.output_dtype = forward.input_dtype;
    linear_.run(api_->linear_forward, entry.engine, forward);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = entry.outputs;
    torch::jit::drop(*stack, kLinearArgs);
    stack->emplace_back(out.view(shape));
  }

  const lk::CApi* api_;
  at::Tensor totals_;
  Engines<MoEEntry> moe_;
  Engines<LinearEntry> linear_;
  std::unique_ptr<torch::Library> library_;  // last member: its kernels go before the table
};

TORCH_LIBRARY_FRAGMENT(lvllm_cpu, m) {
  m.class_<LkOps>("LkOps")
      .def(torch::init<int64_t>())
      .def("add_moe", &LkOps::add_moe)
      .def("add_linear", &LkOps::add_linear)
      .def("remove_moe", &LkOps::remove_moe)
      .def("remove_linear", &LkOps::remove_linear)
      .def("install", &LkOps::install)
      .def("uninstall", &LkOps::uninstall)
      .def("totals", &LkOps::totals);
}

}  // namespace lk_torch
