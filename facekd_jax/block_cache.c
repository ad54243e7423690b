/* A deferred free for very large blocks, preloaded (LD_PRELOAD) into CPU training processes by
 * facekd_jax/xla_flags.py, which documents why: XLA:CPU allocates each step's temporary buffer (1.8 GB for
 * resnet56 at batch 32) with posix_memalign and frees it after the step; glibc maps and unmaps it every time, so
 * the kernel zeroes 1.8 GB of fresh pages per step. Here free() keeps up to SLOTS blocks of at least MIN_BYTES
 * instead of releasing them, and posix_memalign() hands a kept block back for a request it fits (no larger than
 * twice the request, suitably aligned). Kept blocks are ordinary glibc blocks, never touched here, so free(),
 * realloc() and malloc_usable_size() stay correct for them; everything smaller goes straight to glibc. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define SLOTS 2
static const size_t MIN_BYTES = (size_t)64 << 20;

extern void __libc_free(void *);

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static void *kept[SLOTS];
static size_t kept_bytes[SLOTS];
static unsigned long kept_when[SLOTS], clock_ticks;
static int (*next_posix_memalign)(void **, size_t, size_t);

__attribute__((constructor)) static void resolve(void) {
  next_posix_memalign = (int (*)(void **, size_t, size_t))dlsym(RTLD_NEXT, "posix_memalign");
}

void free(void *p) {
  if (p == NULL) return;
  size_t bytes = malloc_usable_size(p);
  if (bytes < MIN_BYTES) {
    __libc_free(p);
    return;
  }
  void *evicted = NULL;
  pthread_mutex_lock(&lock);
  int slot = 0;  /* an empty slot, else the one kept longest */
  for (int i = 0; i < SLOTS; ++i) {
    if (kept[i] == NULL) { slot = i; break; }
    if (kept_when[i] < kept_when[slot]) slot = i;
  }
  evicted = kept[slot];
  kept[slot] = p;
  kept_bytes[slot] = bytes;
  kept_when[slot] = ++clock_ticks;
  pthread_mutex_unlock(&lock);
  if (evicted != NULL) __libc_free(evicted);
}

int posix_memalign(void **out, size_t alignment, size_t bytes) {
  if (bytes >= MIN_BYTES && alignment != 0 && (alignment & (alignment - 1)) == 0) {
    pthread_mutex_lock(&lock);
    for (int i = 0; i < SLOTS; ++i) {
      if (kept[i] != NULL && kept_bytes[i] >= bytes && kept_bytes[i] / 2 <= bytes &&
          (uintptr_t)kept[i] % alignment == 0) {
        *out = kept[i];
        kept[i] = NULL;
        pthread_mutex_unlock(&lock);
        return 0;
      }
    }
    pthread_mutex_unlock(&lock);
  }
  if (next_posix_memalign == NULL) resolve();
  if (next_posix_memalign == NULL) return ENOMEM;
  return next_posix_memalign(out, alignment, bytes);
}
