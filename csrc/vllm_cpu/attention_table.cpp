// vLLM's two CPU attention ops (the KV cache update and the attention) without their Python.
//
// A compiled decode step calls them twice a layer; vLLM implements them in Python, which looks
// the layer, its KV cache and the step's metadata up in the forward context each time before
// calling its own C++ kernels. The table holds what those lookups find: each layer's KV cache
// views and constants (once, after the cache is allocated) and each attention group's metadata
// (once a step). Its kernels, registered over vLLM's for the CPU dispatch key, call vLLM's own
// kernels (_C::cpu_attn_reshape_and_cache, _C::cpu_attention_with_kv_cache) through the
// dispatcher; anything the table does not hold goes to vLLM's Python, kept under another name.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lk_torch/boxed_method.h"

namespace lvllm_cpu {

struct Layer {
  at::Tensor key_cache, value_cache;
  double scale = 1.0, softcap = 0.0, k_scale = 1.0, v_scale = 1.0;
  int64_t sliding_window = -1;
  int64_t group = 0;
  std::string isa;
};

// One attention group's metadata for the step in progress.
struct Step {
  bool set = false;
  int64_t tokens = 0;
  bool causal = true;
  at::Tensor query_start_loc, seq_lens, block_table, scheduler_metadata, slot_mapping;
};

constexpr size_t kAttentionArgs = 8;  // query, key, value, output, layer_name, 2 scales, dep
constexpr size_t kUpdateArgs = 3;     // key, value, layer_name

class AttentionTable : public torch::CustomClassHolder {
 public:
  void add_layer(const std::string& name, at::Tensor key_cache, at::Tensor value_cache, double scale,
                 double softcap, int64_t sliding_window, const std::string& isa, double k_scale,
                 double v_scale, int64_t group) {
    TORCH_CHECK(group >= 0, "attention group must be >= 0, got ", group);
    if (static_cast<size_t>(group) >= steps_.size()) steps_.resize(group + 1);
    layers_[name] = Layer{std::move(key_cache), std::move(value_cache), scale, softcap, k_scale,
                          v_scale, sliding_window, group, isa};
  }

  void begin_step(int64_t group, int64_t tokens, at::Tensor query_start_loc, at::Tensor seq_lens,
                  at::Tensor block_table, at::Tensor scheduler_metadata, bool causal,
                  at::Tensor slot_mapping) {
    TORCH_CHECK(group >= 0 && static_cast<size_t>(group) < steps_.size(), "no attention group ",
                group);
    steps_[group] = Step{true, tokens, causal, std::move(query_start_loc), std::move(seq_lens),
                         std::move(block_table), std::move(scheduler_metadata),
                         std::move(slot_mapping)};
    in_step_ = true;
  }

  void end_step() {
    for (Step& step : steps_) step = Step{};
    in_step_ = false;
  }

  // Puts the table's kernels in front of vLLM's ops (names with their namespace); the fallbacks
  // are vLLM's Python implementations under other names, with the same schemas.
  void install(const std::string& attention_op, const std::string& update_op,
               const std::string& attention_fallback, const std::string& update_fallback) {
    TORCH_CHECK(!library_, "the attention table is already installed");
    auto& dispatcher = c10::Dispatcher::singleton();
    attention_kernel_ = dispatcher.findSchemaOrThrow("_C::cpu_attention_with_kv_cache", "");
    cache_kernel_ = dispatcher.findSchemaOrThrow("_C::cpu_attn_reshape_and_cache", "");
    attention_fallback_ = dispatcher.findSchemaOrThrow(attention_fallback.c_str(), "");
    update_fallback_ = dispatcher.findSchemaOrThrow(update_fallback.c_str(), "");
    const auto [ns, attention_name] = split(attention_op);
    const auto [update_ns, update_name] = split(update_op);
    TORCH_CHECK(ns == update_ns, "both attention ops must share a namespace: ", attention_op, ", ",
                update_op);
    library_ = std::make_unique<torch::Library>(torch::Library::IMPL, ns, c10::DispatchKey::CPU,
                                                __FILE__, __LINE__);
    library_->impl(attention_name.c_str(), lk_torch::boxed_method<&AttentionTable::attention>(this));
    library_->impl(update_name.c_str(), lk_torch::boxed_method<&AttentionTable::update>(this));
  }

  void uninstall() { library_.reset(); }

  // {calls run here, calls handed to vLLM's Python}
  std::vector<int64_t> calls() const { return {handled_, fallen_back_}; }

 private:
  static std::pair<std::string, std::string> split(const std::string& op) {
    const size_t at = op.find("::");
    TORCH_CHECK(at != std::string::npos, "op name without a namespace: ", op);
    return {op.substr(0, at), op.substr(at + 2)};
  }

  // The layer when the table holds it and its group's metadata for this step; else null.
  const Layer* ready_layer(const c10::IValue& name) const {
    if (!in_step_ || !name.isString()) return nullptr;
    const auto found = layers_.find(name.toStringRef());
    if (found == layers_.end() || !steps_[found->second.group].set) return nullptr;
    return &found->second;
  }

  void fall_back(const c10::OperatorHandle& fallback, torch::jit::Stack* stack) {
    ++fallen_back_;
    fallback.callBoxed(stack);
  }

  void attention(torch::jit::Stack* stack) {
    auto args = torch::jit::last(*stack, kAttentionArgs);
    const Layer* layer = ready_layer(args[4]);
    if (layer == nullptr || !args[5].isNone() || !args[6].isNone()) {
      fall_back(*attention_fallback_, stack);
      return;
    }
    const Step& step = steps_[layer->group];
    at::Tensor query = args[0].toTensor().slice(0, 0, step.tokens);
    at::Tensor output = args[3].toTensor().slice(0, 0, step.tokens);
    torch::jit::drop(*stack, kAttentionArgs);
    torch::jit::Stack call{query, layer->key_cache, layer->value_cache, output,
                           step.query_start_loc, step.seq_lens, layer->scale, step.causal,
                           c10::IValue(), layer->sliding_window, step.block_table, layer->softcap,
                           step.scheduler_metadata, c10::IValue(), c10::IValue(), layer->k_scale,
                           layer->v_scale, std::string("auto")};
    attention_kernel_->callBoxed(call);
    ++handled_;
  }

  void update(torch::jit::Stack* stack) {
    auto args = torch::jit::last(*stack, kUpdateArgs);
    const Layer* layer = ready_layer(args[2]);
    if (layer == nullptr) {
      fall_back(*update_fallback_, stack);
      return;
    }
    at::Tensor key = args[0].toTensor();
    at::Tensor value = args[1].toTensor();
    torch::jit::drop(*stack, kUpdateArgs);
    torch::jit::Stack call{key, value, layer->key_cache, layer->value_cache,
                           steps_[layer->group].slot_mapping, layer->isa, layer->k_scale,
                           layer->v_scale, std::string("auto")};
    cache_kernel_->callBoxed(call);
    stack->emplace_back(key.new_empty({0}));
    ++handled_;
  }

  std::unordered_map<std::string, Layer> layers_;
  std::vector<Step> steps_;
  bool in_step_ = false;
  int64_t handled_ = 0, fallen_back_ = 0;
  std::optional<c10::OperatorHandle> attention_kernel_, cache_kernel_, attention_fallback_,
      update_fallback_;
  std::unique_ptr<torch::Library> library_;  // last member: its kernels go before the table
};

TORCH_LIBRARY(lvllm_cpu, m) {
  m.class_<AttentionTable>("AttentionTable")
      .def(torch::init<>())
      .def("add_layer", &AttentionTable::add_layer)
      .def("begin_step", &AttentionTable::begin_step)
      .def("end_step", &AttentionTable::end_step)
      .def("install", &AttentionTable::install)
      .def("uninstall", &AttentionTable::uninstall)
      .def("calls", &AttentionTable::calls);
}

}  // namespace lvllm_cpu
