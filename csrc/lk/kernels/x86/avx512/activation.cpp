#include "lk/kernels/activation.h"

namespace lk::kernels {

const ActivationKernels avx512_activation = activation_table();

}  // namespace lk::kernels
