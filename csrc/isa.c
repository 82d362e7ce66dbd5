/*
 * Instruction-set dispatch (libsodium's pattern): every kernel set compiled
 * into this build is listed once; the most capable one the CPU can run is
 * picked on first use, and tm_set_isa can force any usable one.
 */
#include <stdatomic.h>
#include <string.h>

#include "internal.h"

/* Ordered from least to most capable. */
static const tm_kernel_set *const kernel_sets[] = {
    &tm_kernels_generic,
#ifdef TM_HAVE_AVX2_KERNELS
    &tm_kernels_avx2,
#endif
#ifdef TM_HAVE_AVX512_KERNELS
    &tm_kernels_avx512,
#endif
};
#define N_KERNEL_SETS ((int)(sizeof(kernel_sets) / sizeof(kernel_sets[0])))

/* Set by tm_set_isa or on first use; a racing first use stores the same one. */
static _Atomic(const tm_kernel_set *) active = NULL;

static const tm_kernel_set *best_usable(void)
{
    for (int i = N_KERNEL_SETS - 1; i > 0; --i)
        if (kernel_sets[i]->usable())
            return kernel_sets[i];
    return &tm_kernels_generic;
}

const tm_kernel_set *tm_active_kernels(void)
{
    const tm_kernel_set *set = atomic_load(&active);
    if (set == NULL) {
        set = best_usable();
        atomic_store(&active, set);
    }
    return set;
}

int tm_set_isa(const char *name)
{
    if (name == NULL)
        return TM_ERR_INVALID;
    if (strcmp(name, "auto") == 0 || name[0] == '\0') {
        atomic_store(&active, best_usable());
        return TM_OK;
    }
    for (int i = 0; i < N_KERNEL_SETS; ++i) {
        if (strcmp(kernel_sets[i]->name, name) == 0) {
            if (!kernel_sets[i]->usable())
                return TM_ERR_UNSUPPORTED;
            atomic_store(&active, kernel_sets[i]);
            return TM_OK;
        }
    }
    return TM_ERR_UNSUPPORTED;
}

const char *tm_get_isa(void)
{
    return tm_active_kernels()->name;
}

int tm_isa_count(void)
{
    return N_KERNEL_SETS;
}

const char *tm_isa_name(int index)
{
    if (index < 0 || index >= N_KERNEL_SETS)
        return NULL;
    return kernel_sets[index]->name;
}

int tm_isa_usable(int index)
{
    if (index < 0 || index >= N_KERNEL_SETS)
        return 0;
    return kernel_sets[index]->usable();
}

int64_t tm_gemm_scratch_elems(const tm_kernel_set *kernels)
{
    int mr = kernels->mr_f32 > kernels->mr_f64 ? kernels->mr_f32 : kernels->mr_f64;
    int nr = kernels->nr_f32 > kernels->nr_f64 ? kernels->nr_f32 : kernels->nr_f64;
    const int64_t chunk_rows = (TM_GEMM_ROWS + mr - 1) / mr * mr;
    return chunk_rows * TM_GEMM_KC + (int64_t)mr * nr;
}
