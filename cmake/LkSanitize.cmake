# LK_SANITIZE=ON: AddressSanitizer + UndefinedBehaviorSanitizer build of the lk engine.
# Any UB report aborts (no recovery). Loading the module into Python then needs the ASan
# runtime first in the process: LD_PRELOAD=$(gcc -print-file-name=libasan.so) and, as the
# interpreter itself leaks by design, ASAN_OPTIONS=detect_leaks=0 (see the Makefile).

set(LK_SANITIZE_FLAGS
    -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)

# -g1: line tables are all a sanitizer report needs, and the build takes a quarter less time.
function(lk_enable_sanitizers target)
  target_compile_options(${target} PRIVATE ${LK_SANITIZE_FLAGS} -O1 -g1)
  target_link_options(${target} PRIVATE ${LK_SANITIZE_FLAGS})
endfunction()
