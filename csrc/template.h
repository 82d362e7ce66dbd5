/*
 * Precision template switch: define TM_BITS as 32 or 64, then include this
 * file and a kernel body.  The body is written once with TM_REAL for the
 * element type and TM_FN(name) for every symbol, and instantiated twice
 * (the pffft pattern).  Deliberately without include guards.
 */
#undef TM_REAL
#undef TM_FN
#undef TM_FN_CAT
#undef TM_FN_CAT2
#define TM_FN_CAT2(name, suffix) name##suffix
#define TM_FN_CAT(name, suffix) TM_FN_CAT2(name, suffix)
#undef TM_SQRT
#undef TM_LOG
#undef TM_EXP
#undef TM_COUNT
#undef TM_REAL_MIN
#if TM_BITS == 32
#define TM_REAL float
#define TM_FN(name) TM_FN_CAT(name, _f32)
#define TM_SQRT sqrtf
#define TM_LOG logf
#define TM_EXP expf
#define TM_COUNT int32_t /* an integer as wide as TM_REAL */
#define TM_REAL_MIN FLT_MIN /* the smallest normal number */
#elif TM_BITS == 64
#define TM_REAL double
#define TM_FN(name) TM_FN_CAT(name, _f64)
#define TM_SQRT sqrt
#define TM_LOG log
#define TM_EXP exp
#define TM_COUNT int64_t
#define TM_REAL_MIN DBL_MIN
#else
#error "define TM_BITS as 32 or 64 before including template.h"
#endif
