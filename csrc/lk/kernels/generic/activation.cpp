#include "lk/kernels/activation.h"

namespace lk::kernels {

const ActivationKernels generic_activation = activation_table();

}  // namespace lk::kernels
