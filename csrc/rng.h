/*
 * Counter-based random numbers: a SplitMix64 hash chain keyed on
 * (seed, anchor, draw).  There is no generator state: the number a given
 * (seed, anchor, draw) produces is a pure function of those three integers,
 * so results are identical for any thread count or processing order, and a
 * GPU kernel can reproduce them exactly with 64-bit integer arithmetic.
 *
 *   u = top 53 bits of  mix(mix(mix(seed) ^ anchor) ^ draw)  / 2^53
 *
 * where mix is SplitMix64's finaliser (Steele, Lea & Flood 2014), which
 * passes BigCrush when used as a counter-based generator.
 */
#ifndef TRIPMINE_RNG_H
#define TRIPMINE_RNG_H

#include <stdint.h>

static inline uint64_t tm_mix64(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform double in [0, 1). */
static inline double tm_uniform01(uint64_t seed, int64_t anchor, int64_t draw)
{
    uint64_t z = tm_mix64(seed);
    z = tm_mix64(z ^ (uint64_t)anchor);
    z = tm_mix64(z ^ (uint64_t)draw);
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

/* Uniform integer in [0, count), count >= 1. */
static inline int64_t tm_uniform_index(uint64_t seed, int64_t anchor, int64_t draw,
                                       int64_t count)
{
    int64_t k = (int64_t)(tm_uniform01(seed, anchor, draw) * (double)count);
    return k < count ? k : count - 1;
}

#endif /* TRIPMINE_RNG_H */
