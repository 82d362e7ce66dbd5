/* tm_pairwise_distances_f32 / _f64 (distances_impl.h). */
#include <string.h>

#include "internal.h"

#define TM_BITS 32
#include "template.h"
#include "distances_impl.h"
#undef TM_BITS
#define TM_BITS 64
#include "template.h"
#include "distances_impl.h"
#undef TM_BITS
