// Which cores this process may use, grouped by NUMA node. Read from sched_getaffinity and
// /sys (no libnuma), so containers with a restricted cpuset and one-node machines work.
#pragma once

#include <string>
#include <vector>

namespace lk {

struct Topology {
  // cpus[n] = usable logical CPUs of node n; a node may be empty only when virtual.
  std::vector<std::vector<int>> node_cpus;
  bool virtual_nodes = false;

  int num_nodes() const { return static_cast<int>(node_cpus.size()); }
  int num_cpus() const;
  std::string describe() const;
};

// The machine's nodes restricted to our affinity mask; nodes with no usable CPU are dropped.
Topology detect_topology();
// The usable CPUs split into `nodes` contiguous groups, to exercise partitioning on a
// one-node machine.
Topology virtual_topology(int nodes);

}  // namespace lk
