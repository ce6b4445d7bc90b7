#include "lk/topology.h"

#include <sched.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>

namespace lk {
namespace {

std::set<int> usable_cpus() {
  cpu_set_t mask;
  CPU_ZERO(&mask);
  std::set<int> cpus;
  if (sched_getaffinity(0, sizeof mask, &mask) == 0) {
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (CPU_ISSET(cpu, &mask)) cpus.insert(cpu);
    }
  }
  if (cpus.empty()) cpus.insert(0);
  return cpus;
}

// Parses a kernel cpulist such as "0-3,8,10-11".
std::vector<int> parse_cpulist(const std::string& text) {
  std::vector<int> cpus;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, ',')) {
    if (part.empty() || part == "\n") continue;
    const auto dash = part.find('-');
    const int first = std::stoi(part.substr(0, dash));
    const int last = dash == std::string::npos ? first : std::stoi(part.substr(dash + 1));
    for (int cpu = first; cpu <= last; ++cpu) cpus.push_back(cpu);
  }
  return cpus;
}

// Position of `cpu` among its core's hardware threads (0 for the first), from /sys.
int smt_rank(int cpu) {
  std::ifstream file("/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/thread_siblings_list");
  std::string text;
  if (!file || !std::getline(file, text)) return 0;
  try {
    const std::vector<int> siblings = parse_cpulist(text);
    const auto found = std::find(siblings.begin(), siblings.end(), cpu);
    return found == siblings.end() ? 0 : static_cast<int>(found - siblings.begin());
  } catch (const std::exception&) {
    return 0;
  }
}

// First hardware thread of every core before any second one, so that N workers bound in
// this order use N physical cores where there are that many.
void order_by_core(std::vector<int>& cpus) {
  std::vector<std::pair<int, int>> keyed;
  for (int cpu : cpus) keyed.emplace_back(smt_rank(cpu), cpu);
  std::sort(keyed.begin(), keyed.end());
  for (std::size_t i = 0; i < cpus.size(); ++i) cpus[i] = keyed[i].second;
}

}  // namespace

int Topology::num_cpus() const {
  int total = 0;
  for (const auto& cpus : node_cpus) total += static_cast<int>(cpus.size());
  return total;
}

std::string Topology::describe() const {
  std::ostringstream out;
  out << num_nodes() << (virtual_nodes ? " virtual" : "") << " NUMA node(s), cpus";
  for (const auto& cpus : node_cpus) {
    out << " [";
    for (std::size_t i = 0; i < cpus.size(); ++i) out << (i ? "," : "") << cpus[i];
    out << "]";
  }
  return out.str();
}

Topology detect_topology() {
  const std::set<int> usable = usable_cpus();
  Topology topology;
  std::set<int> assigned;
  for (int node = 0; node < 1024; ++node) {
    std::ifstream file("/sys/devices/system/node/node" + std::to_string(node) + "/cpulist");
    if (!file) {
      if (node > 64) break;  // node ids may have holes, but not forever
      continue;
    }
    std::string text;
    std::getline(file, text);
    std::vector<int> cpus;
    try {
      for (int cpu : parse_cpulist(text)) {
        if (usable.count(cpu) && !assigned.count(cpu)) cpus.push_back(cpu);
      }
    } catch (const std::exception&) {
      continue;  // unreadable entry: treat the node as absent
    }
    if (cpus.empty()) continue;
    assigned.insert(cpus.begin(), cpus.end());
    topology.node_cpus.push_back(std::move(cpus));
  }
  // CPUs /sys did not place (or no /sys at all) form one more node.
  std::vector<int> rest;
  for (int cpu : usable) {
    if (!assigned.count(cpu)) rest.push_back(cpu);
  }
  if (!rest.empty()) topology.node_cpus.push_back(std::move(rest));
  for (auto& cpus : topology.node_cpus) order_by_core(cpus);
  return topology;
}

Topology virtual_topology(int nodes) {
  if (nodes < 1) throw std::invalid_argument("virtual NUMA node count must be >= 1");
  const std::set<int> usable = usable_cpus();
  const std::vector<int> cpus(usable.begin(), usable.end());
  Topology topology;
  topology.virtual_nodes = true;
  topology.node_cpus.resize(nodes);
  const std::size_t count = cpus.size();
  for (int node = 0; node < nodes; ++node) {
    const std::size_t begin = count * node / nodes, end = count * (node + 1) / nodes;
    topology.node_cpus[node].assign(cpus.begin() + begin, cpus.begin() + end);
    order_by_core(topology.node_cpus[node]);
  }
  return topology;
}

}  // namespace lk
