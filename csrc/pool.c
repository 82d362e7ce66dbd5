/*
 * The C core's thread pool: a runtime that shares the CPU with the caller's
 * own thread pools (OpenBLAS, PyTorch) instead of fighting them.
 *
 * tripmine runs between a trainer's matrix products.  GNU OpenMP's workers
 * spin for a long time after every parallel region, and its barriers wait
 * for every team member, including one the OS has descheduled in favour of a
 * BLAS thread; on a small machine both runtimes then steal each other's time
 * slices.  This pool follows pthreadpool's design instead:
 *
 *   - work is cut into many items, claimed one at a time by an atomic
 *     compare-and-swap; the calling thread claims items too, so it never
 *     waits for a worker that has not started: if no worker wakes up, the
 *     caller does all the work, as fast as one thread;
 *   - the caller waits only for items that a worker has claimed and is
 *     running;
 *   - an idle worker spins for a short, bounded time (TM_SPIN_US, by default
 *     50 microseconds: enough to catch the next region of the same call),
 *     then sleeps on a condition variable, using no CPU until the next call.
 *
 * Two kinds of job:
 *
 *   range: [0, n) in chunks of `grain`, in any order, on any participant
 *       (the caller is participant 0, worker k is participant k); per-
 *       participant scratch is indexed by the participant.
 *   slots: units 0 .. n-1, where unit u belongs to slot u % slots and every
 *       slot's units run in increasing order, one at a time.  Any
 *       participant may run a slot's next unit (an idle one steals), but the
 *       body sees the slot, not the participant: state accumulated per slot
 *       (partial sums) is the same whoever ran it, so results depend on the
 *       slot count only, never on scheduling.
 *
 * Claims carry the job's generation: a worker that wakes up late can never
 * claim an item of a job that has ended, and never touches the caller's
 * memory unless it holds a live item (the caller waits for those).
 *
 * One job runs on the pool at a time; a second caller (another Python
 * thread) that finds the pool busy runs its job on its own thread, with the
 * same slots, so its results are identical.  A worker that calls into
 * tripmine again (it cannot, but nothing here relies on it) would run inline.
 *
 * fork(): a child has none of the parent's threads; pthread_atfork resets
 * the pool in the child, which creates fresh workers on its first parallel
 * call.  Workers are created lazily with small stacks; a failure to create
 * one (no memory, RLIMIT_AS, RLIMIT_NPROC) only means fewer participants.
 */
#define _GNU_SOURCE /* sched_getaffinity */
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "internal.h"

#ifndef TM_SPIN_US
#define TM_SPIN_US 50
#endif

/* ---- the single-threaded forms (also used inline by busy or small calls) -- */

static void run_range_inline(int64_t n, tm_range_fn body, void *ctx)
{
    if (n > 0)
        body(ctx, 0, 0, n);
}

static void run_slots_inline(int slots, int64_t n, tm_unit_fn body, void *ctx)
{
    for (int64_t u = 0; u < n; ++u)
        body(ctx, (int)(u % slots), u);
}

#ifdef TM_NO_THREADS

int tm_default_threads(void)
{
    return 1;
}

int tm_pool_workers(void)
{
    return 0;
}

void tm_pool_stats(int64_t *jobs, int64_t *worker_items, int64_t *caller_items)
{
    *jobs = *worker_items = *caller_items = 0;
}

const char *tm_runtime(void)
{
    return "none (single-threaded build)";
}

void tm_parallel_for(int threads, int64_t n, int64_t grain, tm_range_fn body, void *ctx)
{
    (void)threads;
    (void)grain;
    run_range_inline(n, body, ctx);
}

void tm_parallel_slots(int slots, int64_t n, tm_unit_fn body, void *ctx)
{
    run_slots_inline(slots > 0 ? slots : 1, n, body, ctx);
}

#else /* the pthread pool */

#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

/* A claim word: job generation (24 bits) | owned flag (bit 32) | next index
 * (32 bits).  Range jobs use word[0] as the shared chunk cursor; slot jobs
 * one word per slot, owned while a participant runs that slot's unit. */
#define GEN_BITS 24
#define GEN_MASK ((1u << GEN_BITS) - 1)
#define OWNED_BIT ((uint64_t)1 << 32)
#define MAKE_WORD(gen, index) (((uint64_t)((gen) & GEN_MASK) << 40) | (uint64_t)(index))
#define WORD_GEN(w) ((uint32_t)((w) >> 40) & GEN_MASK)
#define WORD_INDEX(w) ((uint32_t)(w))

/* Chunks of one range job stay below 2^31 (the index field). */
#define MAX_CHUNKS ((int64_t)1 << 30)
#define WORKER_STACK_BYTES ((size_t)2 << 20)

enum { JOB_RANGE = 0, JOB_SLOTS = 1 };

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;     /* workers sleep here between jobs */
    pthread_cond_t finished; /* the caller sleeps here until its items are done */
    atomic_uint gen;         /* the current job's generation */
    atomic_int sleepers;     /* workers asleep (or about to sleep) on wake */
    atomic_int caller_waiting;
    atomic_int busy;         /* a caller owns the pool */
    int workers;             /* created so far (under lock) */
    int create_failed;       /* stop trying after a failed pthread_create */
    /* The job, written by the caller before it publishes gen. */
    atomic_int mode, participants, slots;
    atomic_int_fast64_t n, grain, chunks;
    _Atomic(tm_range_fn) range_body;
    _Atomic(tm_unit_fn) unit_body;
    _Atomic(void *) ctx;
    atomic_int_fast64_t remaining; /* items not finished yet */
    /* Statistics for tests and diagnostics: jobs run on the pool, and the
     * items that workers and callers ran in them. */
    atomic_int_fast64_t stat_jobs, stat_worker_items, stat_caller_items;
    _Atomic uint64_t word[TM_MAX_THREADS];
} tm_pool;

static tm_pool pool = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER,
    .finished = PTHREAD_COND_INITIALIZER,
};

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static _Thread_local int inside_worker = 0;
static int64_t spin_ns = (int64_t)TM_SPIN_US * 1000;

const char *tm_runtime(void)
{
    return "tripmine pool (pthreads, spin then sleep)";
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void reset_in_child(void)
{
    /* The child has only the thread that called fork(): forget the parent's
     * workers and any job in flight; the next call creates new workers. */
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.finished, NULL);
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.caller_waiting, 0);
    atomic_store(&pool.busy, 0);
    pool.workers = 0;
    pool.create_failed = 0;
    atomic_fetch_add(&pool.gen, 1);
}

static void init_once(void)
{
    const char *spin = getenv("TRIPMINE_SPIN_US");
    if (spin != NULL && spin[0] != '\0') {
        char *end = NULL;
        const long value = strtol(spin, &end, 10);
        if (end != NULL && *end == '\0' && value >= 0 && value <= 1000000)
            spin_ns = (int64_t)value * 1000;
    }
    pthread_atfork(NULL, NULL, reset_in_child);
}

int tm_default_threads(void)
{
    /* OMP_NUM_THREADS is honoured for continuity with the OpenMP builds of
     * tripmine; otherwise every CPU this process may run on. */
    const char *omp = getenv("OMP_NUM_THREADS");
    if (omp != NULL) {
        char *end = NULL;
        const long value = strtol(omp, &end, 10);
        if (end != omp && value >= 1)
            return value < TM_MAX_THREADS ? (int)value : TM_MAX_THREADS;
    }
    int cpus = 0;
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0)
        cpus = CPU_COUNT(&set);
#endif
    if (cpus < 1) {
        const long online = sysconf(_SC_NPROCESSORS_ONLN);
        cpus = online > 0 ? (int)online : 1;
    }
    return cpus < TM_MAX_THREADS ? cpus : TM_MAX_THREADS;
}

int tm_pool_workers(void)
{
    pthread_mutex_lock(&pool.lock);
    const int workers = pool.workers;
    pthread_mutex_unlock(&pool.lock);
    return workers;
}

void tm_pool_stats(int64_t *jobs, int64_t *worker_items, int64_t *caller_items)
{
    *jobs = atomic_load(&pool.stat_jobs);
    *worker_items = atomic_load(&pool.stat_worker_items);
    *caller_items = atomic_load(&pool.stat_caller_items);
}

/* One finished item; the last one wakes a sleeping caller. */
static void finish_item(void)
{
    if (atomic_fetch_sub(&pool.remaining, 1) == 1 && atomic_load(&pool.caller_waiting)) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_signal(&pool.finished);
        pthread_mutex_unlock(&pool.lock);
    }
}

/* Claims and runs items of job `gen` until none is left to claim.  The job's
 * fields are read before the first claim: a successful claim (same
 * generation) proves they were this job's (every access is sequentially
 * consistent, and the caller resets the claim words before it rewrites the
 * fields).  Returns how many items it ran. */
static int participate(int participant, unsigned gen)
{
    gen &= GEN_MASK;
    const int participants = atomic_load(&pool.participants);
    if (participant >= participants)
        return 0;
    const int mode = atomic_load(&pool.mode);
    void *ctx = atomic_load(&pool.ctx);
    const int64_t n = atomic_load(&pool.n);
    int ran = 0;
    if (mode == JOB_RANGE) {
        const tm_range_fn body = atomic_load(&pool.range_body);
        const int64_t grain = atomic_load(&pool.grain), chunks = atomic_load(&pool.chunks);
        uint64_t w = atomic_load(&pool.word[0]);
        for (;;) {
            if (WORD_GEN(w) != gen || (int64_t)WORD_INDEX(w) >= chunks)
                return ran;
            if (!atomic_compare_exchange_weak(&pool.word[0], &w, w + 1))
                continue;
            const int64_t begin = (int64_t)WORD_INDEX(w) * grain;
            const int64_t end = n - begin < grain ? n : begin + grain;
            body(ctx, participant, begin, end);
            finish_item();
            ran++;
            w = atomic_load(&pool.word[0]);
        }
    }
    const tm_unit_fn body = atomic_load(&pool.unit_body);
    const int slots = atomic_load(&pool.slots);
    /* Start at the participant's own slot and stay on it while it has units;
     * then help the others.  Repeat until a whole sweep finds nothing: a slot
     * owned by someone else at sweep time may be released with units left. */
    for (int progress = 1; progress;) {
        progress = 0;
        for (int k = 0; k < slots; ++k) {
            const int s = (participant + k) % slots;
            const int64_t units = n / slots + (s < n % slots);
            uint64_t w = atomic_load(&pool.word[s]);
            while (WORD_GEN(w) == gen && !(w & OWNED_BIT) && (int64_t)WORD_INDEX(w) < units) {
                if (!atomic_compare_exchange_weak(&pool.word[s], &w, w | OWNED_BIT))
                    continue;
                body(ctx, s, (int64_t)WORD_INDEX(w) * slots + s);
                w = w + 1; /* this slot's next unit, not owned */
                atomic_store(&pool.word[s], w);
                finish_item();
                progress = 1;
                ran++;
            }
        }
    }
    return ran;
}

static void *worker_main(void *arg)
{
    const int id = (int)(intptr_t)arg;
    inside_worker = 1;
    unsigned seen = 0; /* join the job in flight at creation at once */
    for (;;) {
        unsigned gen = atomic_load(&pool.gen);
        if (gen != seen) {
            seen = gen;
            const int ran = participate(id, gen);
            if (ran > 0)
                atomic_fetch_add_explicit(&pool.stat_worker_items, ran, memory_order_relaxed);
            continue;
        }
        /* Spin briefly: the next region of the same call comes soon. */
        const int64_t deadline = now_ns() + spin_ns;
        int spins = 0;
        while ((gen = atomic_load(&pool.gen)) == seen) {
            cpu_relax();
            if ((++spins & 63) == 0 && now_ns() >= deadline)
                break;
        }
        if (gen != seen)
            continue;
        pthread_mutex_lock(&pool.lock);
        atomic_fetch_add(&pool.sleepers, 1);
        while (atomic_load(&pool.gen) == seen)
            pthread_cond_wait(&pool.wake, &pool.lock);
        atomic_fetch_sub(&pool.sleepers, 1);
        pthread_mutex_unlock(&pool.lock);
    }
    return NULL;
}

/* Makes sure `wanted` workers exist (fewer if creation fails); under lock. */
static void ensure_workers(int wanted)
{
    if (wanted > TM_MAX_THREADS - 1)
        wanted = TM_MAX_THREADS - 1;
    if (pool.workers >= wanted || pool.create_failed)
        return;
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0) {
        pool.create_failed = 1;
        return;
    }
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, WORKER_STACK_BYTES);
    while (pool.workers < wanted) {
        pthread_t thread;
        const intptr_t id = pool.workers + 1;
        if (pthread_create(&thread, &attr, worker_main, (void *)id) != 0) {
            pool.create_failed = 1;
            break;
        }
        pool.workers++;
    }
    pthread_attr_destroy(&attr);
}

/* Publishes a job, takes part in it, and returns when every item is done. */
static void run_job(int mode, int participants, int slots, int64_t n, int64_t grain,
                    int64_t chunks, int64_t items, tm_range_fn range_body, tm_unit_fn unit_body,
                    void *ctx)
{
    pthread_mutex_lock(&pool.lock);
    ensure_workers(participants - 1);
    const int workers = pool.workers;
    pthread_mutex_unlock(&pool.lock);
    if (workers == 0) {
        atomic_store(&pool.busy, 0);
        if (mode == JOB_RANGE)
            run_range_inline(n, range_body, ctx);
        else
            run_slots_inline(slots, n, unit_body, ctx);
        return;
    }

    /* 1. Close the previous generation's claims (nothing is claimable until
     *    gen is published: the words carry the new generation already).
     * 2. Write the job.  3. Publish the generation and wake the sleepers. */
    const unsigned gen = atomic_load(&pool.gen) + 1;
    const int words = mode == JOB_RANGE ? 1 : slots;
    for (int s = 0; s < words; ++s)
        atomic_store(&pool.word[s], MAKE_WORD(gen, 0));
    atomic_store(&pool.remaining, items);
    atomic_store(&pool.mode, mode);
    atomic_store(&pool.participants, participants);
    atomic_store(&pool.slots, slots);
    atomic_store(&pool.n, n);
    atomic_store(&pool.grain, grain);
    atomic_store(&pool.chunks, chunks);
    atomic_store(&pool.range_body, range_body);
    atomic_store(&pool.unit_body, unit_body);
    atomic_store(&pool.ctx, ctx);
    atomic_store(&pool.gen, gen);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }

    int64_t caller_items = participate(0, gen);

    /* Wait for the items others hold.  A slot job may also have units left in
     * a slot whose owner released it and was preempted before taking the
     * next: keep claiming while waiting, so such units never wait for it. */
    const int64_t deadline = now_ns() + spin_ns;
    int spins = 0;
    while (atomic_load(&pool.remaining) > 0) {
        if (mode == JOB_SLOTS) {
            const int ran = participate(0, gen);
            caller_items += ran;
            if (ran > 0)
                continue;
        }
        cpu_relax();
        if ((++spins & 63) == 0 && now_ns() >= deadline)
            break;
    }
    if (atomic_load(&pool.remaining) > 0) {
        pthread_mutex_lock(&pool.lock);
        atomic_store(&pool.caller_waiting, 1);
        while (atomic_load(&pool.remaining) > 0) {
            if (mode == JOB_SLOTS) {
                /* Sleep in short steps, claiming any released units between. */
                pthread_mutex_unlock(&pool.lock);
                const int ran = participate(0, gen);
                caller_items += ran;
                pthread_mutex_lock(&pool.lock);
                if (ran || atomic_load(&pool.remaining) == 0)
                    continue;
                struct timespec until;
                clock_gettime(CLOCK_REALTIME, &until);
                until.tv_nsec += 200000;
                if (until.tv_nsec >= 1000000000) {
                    until.tv_sec += 1;
                    until.tv_nsec -= 1000000000;
                }
                pthread_cond_timedwait(&pool.finished, &pool.lock, &until);
            } else {
                pthread_cond_wait(&pool.finished, &pool.lock);
            }
        }
        atomic_store(&pool.caller_waiting, 0);
        pthread_mutex_unlock(&pool.lock);
    }
    atomic_fetch_add_explicit(&pool.stat_jobs, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool.stat_caller_items, caller_items, memory_order_relaxed);
    atomic_store(&pool.busy, 0);
}

/* Takes the pool for this call, or says to run inline. */
static int take_pool(int threads)
{
    if (threads <= 1 || inside_worker)
        return 0;
    pthread_once(&pool_once, init_once);
    int expected = 0;
    return atomic_compare_exchange_strong(&pool.busy, &expected, 1);
}

void tm_parallel_for(int threads, int64_t n, int64_t grain, tm_range_fn body, void *ctx)
{
    if (n <= 0)
        return;
    if (grain < 1)
        grain = 1;
    if (threads > TM_MAX_THREADS)
        threads = TM_MAX_THREADS;
    int64_t chunks = (n + grain - 1) / grain;
    if (chunks > MAX_CHUNKS) {
        grain = (n + MAX_CHUNKS - 1) / MAX_CHUNKS;
        chunks = (n + grain - 1) / grain;
    }
    if (chunks < 2 || !take_pool(threads)) {
        run_range_inline(n, body, ctx);
        return;
    }
    run_job(JOB_RANGE, threads, 1, n, grain, chunks, chunks, body, NULL, ctx);
}

void tm_parallel_slots(int slots, int64_t n, tm_unit_fn body, void *ctx)
{
    if (n <= 0)
        return;
    if (slots < 1)
        slots = 1;
    if (slots > TM_MAX_THREADS)
        slots = TM_MAX_THREADS;
    if (n < 2 || n / slots >= MAX_CHUNKS || !take_pool(slots)) {
        run_slots_inline(slots, n, body, ctx);
        return;
    }
    run_job(JOB_SLOTS, slots, slots, n, 1, n, n, NULL, body, ctx);
}

#endif /* TM_NO_THREADS */
