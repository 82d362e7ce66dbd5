/*
 * Status strings, build facts, thread-count control and aligned allocation
 * (the thread pool itself is pool.c).
 */
#include <stdlib.h>
#include <stdatomic.h>
#include <string.h>

#include "internal.h"
#include "fastmath.h"

const char *tm_strerror(int status)
{
    switch (status) {
    case TM_OK:
        return "success";
    case TM_ERR_NOMEM:
        return "out of memory";
    case TM_ERR_INVALID:
        return "invalid argument";
    case TM_ERR_TOO_LARGE:
        return "size too large";
    case TM_ERR_UNSUPPORTED:
        return "instruction set not supported by this build or CPU";
    case TM_ERR_RANGE:
        return "row norms outside the working precision's range";
    default:
        return "unknown tripmine status";
    }
}

const char *tm_version(void)
{
    return TM_VERSION_STRING;
}

/* The -fsanitize list this build was compiled with ("" for a release build),
 * passed by tripmine/_build.py as TM_SANITIZE. */
const char *tm_sanitizers(void)
{
#ifdef TM_SANITIZE
    return TM_SANITIZE;
#else
    return "";
#endif
}

const char *tm_compiler(void)
{
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#elif defined(_MSC_VER)
    return "msvc";
#else
    return "unknown";
#endif
}

int tm_threaded(void)
{
    return TM_THREADED;
}

/* 0 means "the default"; read once per call, so a change affects later calls. */
static atomic_int requested_threads = 0;

int tm_set_num_threads(int n)
{
    requested_threads = n <= 0 ? 0 : n < TM_MAX_THREADS ? n : TM_MAX_THREADS;
    return TM_OK;
}

/* The pool resets itself in a forked child (pthread_atfork, pool.c), whose
 * calls then create fresh workers: nothing is left to do here. */
void tm_after_fork_child(void)
{
}

/* A call that walks the engine several times pins the thread count of its
 * calling thread for its duration, so that a tm_set_num_threads from another
 * thread cannot change it between passes.  Pins nest: each returns the
 * previous one, which tm_unpin_threads restores. */
static _Thread_local int pinned_threads = 0;

int tm_pin_threads(void)
{
    const int previous = pinned_threads;
    pinned_threads = tm_get_num_threads();
    return previous;
}

void tm_unpin_threads(int previous)
{
    pinned_threads = previous;
}

/* The default thread count, found once (the CPUs this process may run on,
 * or OMP_NUM_THREADS; pool.c). */
static atomic_int default_threads = 0;

int tm_get_num_threads(void)
{
    if (!TM_THREADED)
        return 1;
    if (pinned_threads > 0)
        return pinned_threads;
    const int n = requested_threads;
    if (n > 0)
        return n;
    int fallback = atomic_load_explicit(&default_threads, memory_order_relaxed);
    if (fallback == 0) {
        fallback = tm_default_threads();
        atomic_store(&default_threads, fallback);
    }
    return fallback;
}

int tm_threads_for(int64_t work)
{
    int n = tm_get_num_threads();
    if (work < n)
        n = work > 1 ? (int)work : 1;
    return n;
}

/* The original malloc pointer is stored just below the aligned block. */
#define TM_ALIGN 64

void *tm_alloc(size_t bytes)
{
    if (bytes > SIZE_MAX - TM_ALIGN - sizeof(void *))
        return NULL;
    void *raw = malloc(bytes + TM_ALIGN + sizeof(void *));
    if (raw == NULL)
        return NULL;
    uintptr_t start = (uintptr_t)raw + sizeof(void *);
    uintptr_t aligned = (start + TM_ALIGN - 1) & ~(uintptr_t)(TM_ALIGN - 1);
    memcpy((void *)(aligned - sizeof(void *)), &raw, sizeof(void *));
    return (void *)aligned;
}

void tm_free(void *p)
{
    if (p == NULL)
        return;
    void *raw;
    memcpy(&raw, (char *)p - sizeof(void *), sizeof(void *));
    free(raw);
}

int tm_bytes(int64_t a, int64_t b, size_t elem_size, size_t *out)
{
    if (a < 0 || b < 0)
        return TM_ERR_INVALID;
    uint64_t ua = (uint64_t)a, ub = (uint64_t)b;
    if (ua != 0 && ub > SIZE_MAX / ua)
        return TM_ERR_TOO_LARGE;
    size_t count = (size_t)(ua * ub);
    if (elem_size != 0 && count > SIZE_MAX / elem_size)
        return TM_ERR_TOO_LARGE;
    *out = count * elem_size;
    return TM_OK;
}

static int compare_scored(const void *pa, const void *pb)
{
    const tm_scored *a = pa, *b = pb;
    const int a_nan = a->value != a->value, b_nan = b->value != b->value;
    if (a_nan != b_nan)
        return a_nan - b_nan;
    if (!a_nan && a->value != b->value)
        return a->value < b->value ? -1 : 1;
    return (a->index > b->index) - (a->index < b->index);
}

void tm_sort_scored(tm_scored *items, int64_t count)
{
    if (count > 1)
        qsort(items, (size_t)count, sizeof(tm_scored), compare_scored);
}

/* v[i] = e^v[i] for v[i] <= 0 (fastmath.h), for the tests. */
void tm_exp_nonpositive_array_f32(float *v, int64_t n)
{
    for (int64_t i = 0; i < n; ++i)
        v[i] = tm_exp_nonpositive_f32(v[i]);
}

/* v[i] = ln v[i] (fastmath.h: tm_log_f32). */
void tm_log_array_f32(float *v, int64_t n)
{
    for (int64_t i = 0; i < n; ++i)
        v[i] = tm_log_f32(v[i]);
}
