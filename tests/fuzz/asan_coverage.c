/* Coverage feedback for atheris under gcc's AddressSanitizer (make fuzz-asan).
 *
 * libasan must be preloaded for CPython, and it defines weak no-op __sanitizer_cov_* hooks. Being
 * first in the global scope, they win over libFuzzer's (inside atheris's core module), and libFuzzer
 * then sees no coverage at all. Preloaded before libasan, these forward each hook to libFuzzer's
 * own definition in the module named by COVERGATE_LIBFUZZER. (atheris's own answer is a clang
 * ASan runtime linked with libFuzzer; there is no clang here.)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>

static void *libfuzzer(const char *name) {
    static void *handle;
    if (handle == NULL) {
        const char *path = getenv("COVERGATE_LIBFUZZER");
        handle = path ? dlopen(path, RTLD_NOLOAD | RTLD_LAZY) : NULL;
    }
    return handle ? dlsym(handle, name) : NULL;
}

#define FORWARD(name, params, args)                          \
    void name params {                                       \
        static void (*f) params;                             \
        if (f == NULL) f = (void (*) params)libfuzzer(#name); \
        if (f != NULL) f args;                               \
    }

FORWARD(__sanitizer_cov_8bit_counters_init, (uint8_t *b, uint8_t *e), (b, e))
FORWARD(__sanitizer_cov_pcs_init, (const uintptr_t *b, const uintptr_t *e), (b, e))
FORWARD(__sanitizer_cov_trace_cmp1, (uint8_t a, uint8_t b), (a, b))
FORWARD(__sanitizer_cov_trace_cmp2, (uint16_t a, uint16_t b), (a, b))
FORWARD(__sanitizer_cov_trace_cmp4, (uint32_t a, uint32_t b), (a, b))
FORWARD(__sanitizer_cov_trace_cmp8, (uint64_t a, uint64_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp1, (uint8_t a, uint8_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp2, (uint16_t a, uint16_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp4, (uint32_t a, uint32_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp8, (uint64_t a, uint64_t b), (a, b))
FORWARD(__sanitizer_cov_trace_switch, (uint64_t v, uint64_t *cases), (v, cases))
FORWARD(__sanitizer_cov_trace_div4, (uint32_t v), (v))
FORWARD(__sanitizer_cov_trace_div8, (uint64_t v), (v))
FORWARD(__sanitizer_cov_trace_gep, (uintptr_t i), (i))
FORWARD(__sanitizer_cov_trace_pc_indir, (uintptr_t c), (c))
