/* The tile engine, instantiated for float and double (engine_impl.h). */
#include <math.h>
#include <stdatomic.h>
#include <string.h>

#include "internal.h"

#define TM_BITS 32
#include "template.h"
#include "engine_impl.h"
#undef TM_BITS
#define TM_BITS 64
#include "template.h"
#include "engine_impl.h"
#undef TM_BITS
