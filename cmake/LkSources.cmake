# Source sets of the lk engine and the instruction-set flags each one is compiled with.
#
# Only the files of a kernels/<arch>/<isa>/ directory get that ISA's -m flags; everything else
# is compiled for baseline x86-64, so the module loads on any x86-64 CPU and the engine picks
# kernel variants at run time (never -march=native here).
#
# Caution for kernel authors: an inline function or template instantiated in an ISA file
# (from a shared header or the standard library) is emitted there with that ISA's
# instructions, and the linker keeps one copy for the whole module. Keep ISA files' code in an
# anonymous namespace and do not instantiate shared inline code in them; LkIsaCheck.cmake
# fails the build when such a symbol is shared between an ISA file and the rest.

set(LK_FLAGS_AVX2 -mavx2 -mfma -mf16c)
# Each tier's flags are exactly what the run-time check of its level requires
# (cpu_features.cpp): an extension allowed beyond it could reach the code through the
# compiler and stop a CPU that passed the check with SIGILL.
# GCC 12's own avx512fintrin.h trips -Wmaybe-uninitialized (_mm512_setzero_ps and friends).
set(LK_FLAGS_AVX512 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c -Wno-maybe-uninitialized)
set(LK_FLAGS_AVX512_VNNI ${LK_FLAGS_AVX512} -mavx512vnni)
set(LK_FLAGS_AVX512_BF16 ${LK_FLAGS_AVX512_VNNI} -mavx512bf16 -mavx512vbmi)
set(LK_FLAGS_AMX ${LK_FLAGS_AVX512_BF16} -mamx-tile -mamx-int8 -mamx-bf16)

# lk_glob(<out-var> <dir relative to csrc/lk> [flags...])
# Globs <dir>/*.cpp (re-globbed at every build, so new files are picked up), gives them the
# extra compile flags, appends them to <out-var> in the caller's scope.
function(lk_glob out_var dir)
  file(GLOB files CONFIGURE_DEPENDS "${LK_SOURCE_ROOT}/${dir}/*.cpp")
  list(SORT files)
  if(files AND ARGN)
    set_source_files_properties(${files} PROPERTIES COMPILE_OPTIONS "${ARGN}")
  endif()
  set(${out_var} ${${out_var}} ${files} PARENT_SCOPE)
endfunction()
