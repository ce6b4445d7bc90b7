// A boxed kernel that calls a member function of the object that registered it, for the
// dispatcher's callers that pass arguments on a stack (inductor's C++ wrapper among them).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <memory>

namespace lk_torch {

template <class Owner, void (Owner::*Method)(torch::jit::Stack*)>
class BoxedMethod : public c10::OperatorKernel {
 public:
  explicit BoxedMethod(Owner* owner) : owner_(owner) {}
  void operator()(const c10::OperatorHandle&, c10::DispatchKeySet, torch::jit::Stack* stack) {
    (owner_->*Method)(stack);
  }

 private:
  Owner* owner_;
};

// The kernel for torch::Library::impl; the owner must outlive the registration.
template <auto Method, class Owner>
torch::CppFunction boxed_method(Owner* owner) {
  return torch::CppFunction::makeFromBoxedFunctor(std::make_unique<BoxedMethod<Owner, Method>>(owner));
}

}  // namespace lk_torch
