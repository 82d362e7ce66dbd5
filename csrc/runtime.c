/*
 * Status strings, build facts, thread control and aligned allocation.
 */
#include <stdlib.h>
#include <stdatomic.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__) && defined(_OPENMP)
#include <stdio.h>
#include <sys/resource.h>
#include <unistd.h>
#define TM_CHECK_THREAD_ROOM 1
#endif

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

int tm_openmp_version(void)
{
#ifdef _OPENMP
    return _OPENMP;
#else
    return 0;
#endif
}

/* 0 means "the default"; read once per call, so a change affects later calls. */
static atomic_int requested_threads = 0;

int tm_set_num_threads(int n)
{
    requested_threads = n > 0 ? n : 0;
    return TM_OK;
}

/* GNU OpenMP's thread pool does not survive fork(): a child whose parent
 * already ran a parallel region hangs in its first one.  So the C core
 * notes when it has run threads, and a child forked after that runs
 * single-threaded (tm_after_fork_child, called by the Python layer's fork
 * hook). */
static atomic_int ran_threads = 0;
static atomic_int single_after_fork = 0;

void tm_after_fork_child(void)
{
    if (atomic_load(&ran_threads))
        atomic_store(&single_after_fork, 1);
}

/* A call that walks the engine several times pins the thread count of its
 * calling thread for its duration, so that a tm_set_num_threads from another
 * thread cannot change it between passes.  Pins nest: each returns the
 * previous one, which tm_unpin_threads restores. */
static _Thread_local int pinned_threads = 0;

#ifdef TM_CHECK_THREAD_ROOM
/* GNU OpenMP ends the process (exit status 1, no way to catch it) when it
 * cannot create a worker thread, e.g. when RLIMIT_AS leaves no room for
 * another thread stack.  So when an address-space limit is set, a team is
 * capped by the room left: each new thread may need a stack of
 * OMP_STACKSIZE or RLIMIT_STACK (8 MiB by default) and its guard page.
 * Without a limit (the usual case) this costs one getrlimit call. */
static int thread_room(int wanted)
{
    struct rlimit as_limit, stack_limit;
    if (wanted <= 1 || getrlimit(RLIMIT_AS, &as_limit) != 0 ||
        as_limit.rlim_cur == RLIM_INFINITY)
        return wanted;
    double stack = 8.0 * 1024 * 1024;
    if (getrlimit(RLIMIT_STACK, &stack_limit) == 0 && stack_limit.rlim_cur != RLIM_INFINITY &&
        stack_limit.rlim_cur > 0)
        stack = (double)stack_limit.rlim_cur;
    const char *omp_stack = getenv("OMP_STACKSIZE");
    if (omp_stack != NULL) {
        char *end = NULL;
        const double value = strtod(omp_stack, &end);
        const char unit = end != NULL ? *end : '\0';
        const double scale = unit == 'B' || unit == 'b' ? 1.0
                             : unit == 'M' || unit == 'm' ? 1024.0 * 1024
                             : unit == 'G' || unit == 'g' ? 1024.0 * 1024 * 1024
                                                          : 1024.0; /* K, or no unit */
        if (value > 0)
            stack = value * scale;
    }
    long pages = 0;
    FILE *statm = fopen("/proc/self/statm", "r");
    if (statm == NULL)
        return 1; /* too tight even to look: stay on this thread */
    const int read = fscanf(statm, "%ld", &pages);
    fclose(statm);
    if (read != 1)
        return 1;
    const double used = (double)pages * (double)sysconf(_SC_PAGESIZE);
    const double room = (double)as_limit.rlim_cur - used;
    const double per_thread = stack + 2.0 * 1024 * 1024; /* guard page, TLS, arena slack */
    const double fit = room > 0 ? room / per_thread : 0;
    return fit >= wanted - 1 ? wanted : 1 + (int)fit;
}
#else
static int thread_room(int wanted)
{
    return wanted;
}
#endif

int tm_pin_threads(void)
{
    const int previous = pinned_threads;
    pinned_threads = thread_room(tm_get_num_threads());
    return previous;
}

void tm_unpin_threads(int previous)
{
    pinned_threads = previous;
}

int tm_get_num_threads(void)
{
    if (pinned_threads > 0)
        return pinned_threads;
#ifdef _OPENMP
    if (atomic_load(&single_after_fork))
        return 1;
    int n = requested_threads;
    return n > 0 ? n : omp_get_max_threads();
#else
    return 1;
#endif
}

int tm_threads_for(int64_t work)
{
    int n = tm_get_num_threads();
    if (work < n)
        n = work > 1 ? (int)work : 1;
    if (pinned_threads == 0) /* a pin already accounts for the room */
        n = thread_room(n);
    if (n > 1 && !atomic_load_explicit(&ran_threads, memory_order_relaxed))
        atomic_store(&ran_threads, 1);
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
