/* A stand-in for libcuda.so.1 with the four entry points lk's stream bridge uses, for
 * testing the bridge on machines without a GPU. "Device" pointers are host pointers; every
 * call is recorded instead of run, and fake_run() plays the recording back in order, like a
 * stream reaching its work; fake_run(0) keeps the recording, like a captured graph that is
 * replayed again and again. */
#include <stddef.h>
#include <string.h>

typedef void (*HostFunction)(void*);
enum { COPY, HOST_FUNCTION };
struct Operation {
  int kind;
  void* destination;
  const void* source;
  size_t bytes;
  HostFunction function;
  void* data;
};

static struct Operation recorded[1024];
static int count;
static int fail_next;

static int record(struct Operation operation) {
  if (fail_next) {
    int code = fail_next;
    fail_next = 0;
    return code;
  }
  if (count == (int)(sizeof recorded / sizeof recorded[0])) return 2; /* out of memory */
  recorded[count++] = operation;
  return 0;
}

int cuMemcpyDtoHAsync_v2(void* destination, unsigned long long source, size_t bytes, void* stream) {
  (void)stream;
  struct Operation operation = {COPY, destination, (const void*)(size_t)source, bytes, NULL, NULL};
  return record(operation);
}

int cuMemcpyHtoDAsync_v2(unsigned long long destination, const void* source, size_t bytes, void* stream) {
  (void)stream;
  struct Operation operation = {COPY, (void*)(size_t)destination, source, bytes, NULL, NULL};
  return record(operation);
}

int cuLaunchHostFunc(void* stream, HostFunction function, void* data) {
  (void)stream;
  struct Operation operation = {HOST_FUNCTION, NULL, NULL, 0, function, data};
  return record(operation);
}

int cuGetErrorString(int error, const char** text) {
  *text = error == 1 ? "CUDA_ERROR_INVALID_VALUE (fake)" : "fake driver error";
  return 0;
}

int fake_recorded(void) { return count; }

void fake_fail_next(int code) { fail_next = code; }

void fake_run(int clear) {
  for (int i = 0; i < count; ++i) {
    if (recorded[i].kind == COPY) {
      memcpy(recorded[i].destination, recorded[i].source, recorded[i].bytes);
    } else {
      recorded[i].function(recorded[i].data);
    }
  }
  if (clear) count = 0;
}
