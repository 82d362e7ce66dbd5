/* Miners, instantiated for float and double (mining_impl.h). */
#include <math.h>
#include <string.h>

#include "internal.h"
#include "rng.h"

#define TM_BITS 32
#include "template.h"
#include "row_tools_impl.h"
#include "mining_impl.h"
#undef TM_BITS
#undef TM_SCRATCH
#define TM_BITS 64
#include "template.h"
#include "row_tools_impl.h"
#include "mining_impl.h"
#undef TM_BITS

double tm_uniform(uint64_t seed, int64_t anchor, int64_t draw)
{
    return tm_uniform01(seed, anchor, draw);
}
