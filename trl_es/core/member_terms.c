/* The low-rank space's per-member term, fused into one pass over the rows (trl_es/core/cpu_kernel.py loads it).

   For G member blocks of `rows_per_member` rows each, all arrays fp32 and contiguous:

       out[row, :] += sum_k (x[row, :] . b[g, k, :]) * a[g, k, :]      g = row / rows_per_member

   with x (rows, in), b (G, r, in), a (G, r, out) (already scaled by the member's sign * sigma / sqrt(r)) and out
   (rows, out), the fresh output of the layer's plain F.linear. Done with torch ops this is a batched matmul, a
   multiply-add and the views between them: on a small CPU model their call overhead costs as much as the work.

   Each row is written by one thread in a fixed order, so the result does not depend on the number of threads. The
   OpenMP runtime is the one torch has already loaded (same soname), so torch.set_num_threads applies here too. */

void add_member_terms(const float *x, const float *b, const float *a, float *out, long rows, long rows_per_member,
                      long in, long out_features, long rank, long parallel_above) {
#pragma omp parallel for schedule(static) if (rows * (in + out_features) * rank > parallel_above)
    for (long row = 0; row < rows; row++) {
        long member = row / rows_per_member;
        const float *x_row = x + row * in;
        float *out_row = out + row * out_features;
        for (long k = 0; k < rank; k++) {
            const float *b_k = b + (member * rank + k) * in;
            const float *a_k = a + (member * rank + k) * out_features;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (long i = 0; i < in; i++) dot += x_row[i] * b_k[i];
#pragma omp simd
            for (long j = 0; j < out_features; j++) out_row[j] += dot * a_k[j];
        }
    }
}
