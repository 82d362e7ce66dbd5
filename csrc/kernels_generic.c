/* The generic (portable C) kernel set: always compiled, always usable. */
#include "internal.h"

#define TM_BITS 32
#include "template.h"
#include "kernel_generic_impl.h"
#include "row_kernel_impl.h"
#undef TM_BITS
#undef TM_GENERIC_MR
#undef TM_GENERIC_NR
#define TM_BITS 64
#include "template.h"
#include "kernel_generic_impl.h"
#include "row_kernel_impl.h"
#undef TM_BITS

static int generic_usable(void)
{
    return 1;
}

const tm_kernel_set tm_kernels_generic = {
    "generic",         generic_usable,
    TM_GENERIC_MR,     TM_GENERIC_NR, dot_generic_f32,
    TM_GENERIC_MR,     TM_GENERIC_NR, dot_generic_f64,
    batch_all_row_kernel_f32, batch_all_row_kernel_f64,
    weighted_row_kernel_f32, weighted_row_kernel_f64,
    weighted_weights_kernel_f32, weighted_weights_kernel_f64,
    gram_row_kernel_f32, gram_row_kernel_f64,
    clamp_row_kernel_f32, clamp_row_kernel_f64,
    softmax_max_kernel_f32, softmax_max_kernel_f64,
    softmax_exp_kernel_f32, softmax_exp_kernel_f64,
    softmax_grad_kernel_f32, softmax_grad_kernel_f64,
    pack_panel_kernel_f32, pack_panel_kernel_f64,
    center_row_kernel_f32, center_row_kernel_f64,
    center_acc_kernel_f32, center_acc_kernel_f64,
    lifted_lse_kernel_f32, lifted_lse_kernel_f64,
    lifted_beta_kernel_f32, lifted_beta_kernel_f64,
};
