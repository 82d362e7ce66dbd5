/* tm_pairwise_distances and tm_nearest_neighbors, _f32 / _f64 (distances_impl.h). */
#include <math.h>
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
