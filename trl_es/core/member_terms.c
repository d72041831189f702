/* The low-rank space's per-member term, fused into one pass over the rows (trl_es/core/cpu_kernel.py loads it).

   For `members` blocks of equal rows, all floats fp32 and contiguous:

       out[row, :] += scale[g] * sum_k (x[row, :] . B_d[:, k]) * A_d[:, k]      g = row / rows per member, d = direction[g]

   with x (rows, in) the layer's input, out (rows, out) the fresh output of its plain F.linear, and the factors read
   where the noise drew them: `factors` (directions, out + in, rank), A_d its first `out` rows, B_d the other `in`.
   Done with torch ops this is a gather of the members' factors, a batched matmul, a multiply-add and the views
   between them; on a small CPU model their call overhead costs about as much as the layer's own GEMM.

   Each row is written by one thread in a fixed order, so the result does not depend on the number of threads. The
   OpenMP runtime is the one torch has already loaded (same soname), so torch.set_num_threads applies here too. */

#include <stdint.h>

typedef struct {
    const float *factors;   /* (directions, out + in, rank) */
    const int64_t *direction;  /* (members,): the direction of each member block */
    const float *scale;     /* (members,): sign * sigma / sqrt(rank) of each member */
    int64_t members, in, out, rank;
    int64_t parallel_above;    /* rows * (in + out) * rank above which rows are split over the threads */
} member_terms;

void add_member_terms(const float *x, float *out, int64_t rows, const member_terms *p) {
    const int64_t in = p->in, out_features = p->out, rank = p->rank, per_member = rows / p->members;
    const int64_t stride = (in + out_features) * rank;
#pragma omp parallel for schedule(static) if (rows * (in + out_features) * rank > p->parallel_above)
    for (int64_t row = 0; row < rows; row++) {
        const int64_t member = row / per_member;
        const float *a = p->factors + p->direction[member] * stride, *b = a + out_features * rank;
        const float *x_row = x + row * in;
        float *out_row = out + row * out_features;
        for (int64_t k = 0; k < rank; k++) {
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < in; i++) dot += x_row[i] * b[i * rank + k];
            const float coefficient = p->scale[member] * dot;
#pragma omp simd
            for (int64_t j = 0; j < out_features; j++) out_row[j] += coefficient * a[j * rank + k];
        }
    }
}
