/* Losses, instantiated for float and double (losses_impl.h on top of the
 * miners' row machinery in mining_impl.h). */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "rng.h"

#define TM_BITS 32
#include "template.h"
#include "row_tools_impl.h"
#include "dense_impl.h"
#include "losses_impl.h"
#undef TM_BITS
#undef TM_SCRATCH
#define TM_BITS 64
#include "template.h"
#include "row_tools_impl.h"
#include "dense_impl.h"
#include "losses_impl.h"
#undef TM_BITS
