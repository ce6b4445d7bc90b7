#include "lk/kernels/activation.h"

namespace lk::kernels {

const ActivationKernels avx2_activation = activation_table();

}  // namespace lk::kernels
