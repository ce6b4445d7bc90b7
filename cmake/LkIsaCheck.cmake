# cmake -DNM=<nm> -DWIDE_OBJECTS=a.o|b.o -DBASE_OBJECTS=c.o|d.o -P LkIsaCheck.cmake
#
# Run after linking lvllm._lk. Inline functions and template instantiations are emitted as
# weak symbols in every object that uses them, and the linker keeps one copy for the module.
# If an object of a higher ISA tier ("wide": AVX-512, VNNI, AMX) and one of a lower tier
# ("base": the floor, or a lower wide tier) both carry such a function, the kept copy may be
# the wide one, and the lower tier's code then runs its instructions: an illegal-instruction
# crash on a CPU without them, far from the kernel that caused it. This fails the build
# when a weak function defined by a wide object is also defined or called by a base object. Fix: move the helper into the ISA file's anonymous namespace
# (or mark it static), or make sure baseline files do not use it.

cmake_minimum_required(VERSION 3.20)

if(NOT NM OR NOT DEFINED WIDE_OBJECTS OR NOT DEFINED BASE_OBJECTS)
  message(FATAL_ERROR "LkIsaCheck.cmake: NM, WIDE_OBJECTS and BASE_OBJECTS are required")
endif()
string(REPLACE "|" ";" wide_objects "${WIDE_OBJECTS}")
string(REPLACE "|" ";" base_objects "${BASE_OBJECTS}")

# Lines of `nm -P` are "name type [value size]"; collect names of the wanted types.
function(lk_symbols out_var types)
  set(names)
  foreach(object IN LISTS ARGN)
    execute_process(COMMAND "${NM}" -P "${object}" OUTPUT_VARIABLE listing
                    RESULT_VARIABLE rc ERROR_VARIABLE err)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "LkIsaCheck.cmake: ${NM} ${object} failed: ${err}")
    endif()
    string(REGEX MATCHALL "[^\n]+" lines "${listing}")
    foreach(line IN LISTS lines)
      if(line MATCHES "^([^ ]+) ([A-Za-z])( |$)")
        set(name "${CMAKE_MATCH_1}")
        string(FIND "${types}" "${CMAKE_MATCH_2}" at)
        if(at GREATER -1)
          list(APPEND names "${name}")
        endif()
      endif()
    endforeach()
  endforeach()
  list(REMOVE_DUPLICATES names)
  set(${out_var} "${names}" PARENT_SCOPE)
endfunction()

lk_symbols(wide_weak "W" ${wide_objects})
lk_symbols(base_uses "WU" ${base_objects})

set(shared)
foreach(name IN LISTS wide_weak)
  if(name IN_LIST base_uses)
    list(APPEND shared "${name}")
  endif()
endforeach()

if(shared)
  list(JOIN shared "\n  " shown)
  message(FATAL_ERROR
    "Objects of a higher ISA tier define weak functions that a lower tier's code also uses; "
    "the linker may keep the higher tier's copy for everyone (SIGILL on CPUs without that "
    "level). Keep ISA-specific code in "
    "an anonymous namespace of its own file. Symbols (mangled, c++filt them):\n  ${shown}\n"
    "(configure with -DLK_ISA_CHECK=OFF to skip this check)")
endif()
