#include "lk/runtime.h"

#include "lk/openmp_team.h"

#include <sstream>
#include <stdexcept>

namespace lk {
namespace {

Topology make_topology(int virtual_nodes) {
  if (virtual_nodes < 0) throw std::invalid_argument("virtual NUMA node count must be >= 0");
  return virtual_nodes > 0 ? virtual_topology(virtual_nodes) : detect_topology();
}

Isa choose_isa(const std::string& requested) {
  const Isa best = detect_best_isa();
  if (requested.empty()) return best;
  const Isa isa = parse_isa(requested);
  if (static_cast<int>(isa) > static_cast<int>(best)) {
    throw std::invalid_argument("ISA " + requested + " is not supported by this CPU, which runs up to " +
                                isa_name(best));
  }
  return isa;
}

std::unique_ptr<Executor> make_executor(const Topology& topology, const RuntimeOptions& options) {
  if (options.workers == Workers::OpenMpTeam) return std::make_unique<OpenMpTeam>(topology, options.threads);
  return std::make_unique<ThreadPool>(topology, options.threads, options.binding, options.power_saving);
}

}  // namespace

Runtime::Runtime(const RuntimeOptions& options)
    : topology_(make_topology(options.virtual_nodes)),
      workers_(options.workers),
      kernels_(kernels::kernel_set(choose_isa(options.isa))),
      executor_(make_executor(topology_, options)) {
  scratch_.hidden.resize(topology_.num_nodes());
  scratch_.hidden_q.resize(topology_.num_nodes());
  scratch_.staged_hidden.resize(topology_.num_nodes());
  scratch_.partial.resize(topology_.num_nodes());
}

std::string Runtime::describe() const {
  std::ostringstream out;
  out << "ISA " << isa_name(isa()) << ", " << executor_->describe() << "; " << topology_.describe();
  return out.str();
}

}  // namespace lk
