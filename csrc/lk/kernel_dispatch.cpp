#include <stdexcept>

#include "lk/kernels/kernels.h"

namespace lk::kernels {

// Each set's .format in WeightFormat order: F32, F16, BF16, INT8, INT4, FP8, MXFP4, NVFP4.
const KernelSet& kernel_set(Isa isa) {
  static const KernelSet generic_set{
      .isa = Isa::Generic,
      .format = {generic_f32, generic_f16, generic_bf16, generic_int8, generic_int4, generic_fp8, generic_mxfp4,
                 generic_nvfp4},
      .activation = generic_activation};
#if defined(__x86_64__)
  static const KernelSet avx2_set{
      .isa = Isa::Avx2,
      .format = {avx2_f32, avx2_f16, avx2_bf16, avx2_int8, avx2_int4, avx2_fp8, avx2_mxfp4, avx2_nvfp4},
      .activation = avx2_activation};
  static const KernelSet avx512_set{
      .isa = Isa::Avx512,
      .format = {avx512_f32, avx512_f16, avx512_bf16, avx512_int8, avx512_int4, avx512_fp8, avx512_mxfp4,
                 avx512_nvfp4},
      .activation = avx512_activation};
  // AVX512_VNNI changes only the integer formats (MXFP4 and NVFP4 among them).
  static const KernelSet avx512_vnni_set{
      .isa = Isa::Avx512Vnni,
      .format = {avx512_f32, avx512_f16, avx512_bf16, avx512_vnni_int8, avx512_vnni_int4, avx512_fp8,
                 avx512_vnni_mxfp4, avx512_vnni_nvfp4},
      .activation = avx512_activation};
  // AVX512_BF16 multiplies bf16 pairs in prefill of bf16 and FP8; its AVX512_VBMI looks
  // MXFP4's and NVFP4's codes up with vpermb.
  static const KernelSet avx512_bf16_set{
      .isa = Isa::Avx512Bf16,
      .format = {avx512_f32, avx512_f16, avx512_bf16_bf16, avx512_vnni_int8, avx512_vnni_int4, avx512_bf16_fp8,
                 avx512_bf16_mxfp4, avx512_bf16_nvfp4},
      .activation = avx512_activation};
  // AMX adds tiles to prefill of bf16, INT8, INT4 and FP8 (decode as below; MXFP4 and NVFP4
  // as AVX512_BF16).
  static const KernelSet amx_set{
      .isa = Isa::Amx,
      .format = {avx512_f32, avx512_f16, amx_bf16, amx_int8, amx_int4, amx_fp8, avx512_bf16_mxfp4,
                 avx512_bf16_nvfp4},
      .activation = avx512_activation};
  switch (isa) {
    case Isa::Generic: return generic_set;
    case Isa::Avx2: return avx2_set;
    case Isa::Avx512: return avx512_set;
    case Isa::Avx512Vnni: return avx512_vnni_set;
    case Isa::Avx512Bf16: return avx512_bf16_set;
    case Isa::Amx: return amx_set;
  }
#endif
  if (isa == Isa::Generic) return generic_set;
  throw std::invalid_argument(std::string("no kernels for ISA ") + isa_name(isa));
}

}  // namespace lk::kernels
