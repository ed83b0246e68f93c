#include "bioquant/quant/quant.h"
namespace bioquant::detail {
void qgemm_avx2(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin,
                int64_t row_end, float* y, int64_t ldy) { qgemm_scalar(x, ldx, n_tokens, w, row_begin, row_end, y, ldy); }
}
