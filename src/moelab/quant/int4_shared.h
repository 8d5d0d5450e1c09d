// The entry points both kernel variants export, on the functions each defines (BLOCK, XB,
// quantize_rows, mm_quantized; included by int4_vnni.c and int4_avx2.c after them). What is
// here is portable C (the compiler vectorises it):
//   moelab_w4a8_mm              one matrix (`moelab.quant.vnni.w4a8_mm`);
//   moelab_w4a8_swiglu_experts  one MoE layer's routed experts (swiglu) in one call: the
//     whole per-expert loop of `moelab.quant.experts.run_rows` (its reference: two
//     `w4a8_mm` per expert, the activation between them in float32 rounded to bf16),
//     without Python between the GEMMs (~40 us a layer at decode on Zen 5, as much as the
//     kernel's own work at one row).

// bf16 <-> float32 as torch converts (round to nearest even; NaN stays NaN).
static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (uint16_t)(f != f ? 0x7fc0u : r);
}

// exp(x) = 2^n exp(r), r = x - n ln2 (ln2 in two parts), exp(r) by Cephes' expf polynomial
// (~1 ulp); x clamped to [-87.3, 88] so that 2^n stays a normal float. Its results are
// rounded to bf16 before anything reads them.
static inline float exp_f32(float x) {
  x = x < 88.f ? x : 88.f;
  x = x > -87.3f ? x : -87.3f;
  const float shift = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer, half to even
  float n = (x * 1.44269504088896341f + shift) - shift;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float e = p * (r * r) + r + 1.f;
  uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  return e * scale;
}

// a [n, F] bf16 = bf16((silu(gate) * up) * w_r) from h [n, 2F] bf16 = [gate | up], in float32
// and in the order `moelab.moe.cpu_kernels.act_forward` then `run_rows` take.
// silu(g) = g / (1 + exp(-g)): a NaN g stays NaN.
static void swiglu_rows(const uint16_t *h, const float *w, int n, int F, uint16_t *a) {
  for (int r = 0; r < n; r++) {
    const uint16_t *g = h + (size_t)r * 2 * F, *u = g + F;
    uint16_t *ar = a + (size_t)r * F;
    float wr = w[r];
    for (int f = 0; f < F; f++) {
      float gv = bf16_to_f32(g[f]);
      float s = gv / (1.f + exp_f32(-gv));
      ar[f] = f32_to_bf16((s * bf16_to_f32(u[f])) * wr);
    }
  }
}

static int shapes_fit(int O, int I, int G) {
  return O >= BLOCK && O % BLOCK == 0 && G >= XB && G % XB == 0 && I >= G && I % G == 0;
}

// The layer, rows grouped by expert:
//   x      [X, D] bf16 tokens; assignment a reads row idx[a] (idx NULL: row a)
//   counts [E] int64 rows per expert, in order; A = their sum
//   w      [A] float32 combine weights
//   p_in   [E, 2F, D/2], sz_in [E, D/G, 2F, 2]; p_out [E, D, F/2], sz_out [E, F/G, D, 2]
//   out    float32: combine 0: [A, D], out[a] = y_a; combine 1: [X, D], zeroed here, out[idx[a]] += y_a
// y_a is the bf16 output of expert e's down projection, as the loop's. Returns 0: done;
// 1: shapes the kernel does not take; 2: out of memory; and before anything is written,
// 3: counts that do not sum to A (or are negative) or an index outside [0, X); 4: an
// expert with more than max_rows rows (where the caller's dense path is faster).
int moelab_w4a8_swiglu_experts(const uint16_t *x, const int64_t *idx, const int64_t *counts, const float *w,
                               const uint8_t *p_in, const uint16_t *sz_in, const uint8_t *p_out,
                               const uint16_t *sz_out, float *out, int X, int A, int E, int D, int F, int G,
                               int combine, int max_rows, int threads) {
  if (!shapes_fit(2 * F, D, G) || !shapes_fit(D, F, G)) return 1;
  int64_t total = 0, most = 0;
  for (int e = 0; e < E; e++) {
    if (counts[e] < 0) return 3;
    total += counts[e];
    most = counts[e] > most ? counts[e] : most;
  }
  if (total != A || (combine && !idx && X != A)) return 3;
  if (idx)
    for (int a = 0; a < A; a++)
      if (idx[a] < 0 || idx[a] >= X) return 3;
  if (most > max_rows) return 4;
  if (combine) memset(out, 0, sizeof(float) * (size_t)X * D);
  int M = (int)most, K = D > F ? D : F;  // the most rows of one expert, the widest input
  if (M == 0) return 0;
  size_t qb = ((size_t)M * K + 63) & ~(size_t)63;
  char *buf = malloc(qb + sizeof(float) * (size_t)M * (K / XB + K / G) + 64 +
                     sizeof(uint16_t) * (size_t)M * (D + 2 * F + F + D));
  if (!buf) return 2;
  int8_t *xq = (int8_t *)buf;
  float *xs = (float *)(buf + qb), *xsum = xs + (size_t)M * (K / XB);
  uint16_t *xg = (uint16_t *)(((uintptr_t)(xsum + (size_t)M * (K / G)) + 63) & ~(uintptr_t)63);  // [M, D]
  uint16_t *h = xg + (size_t)M * D, *act = h + (size_t)M * 2 * F, *y = act + (size_t)M * F;  // [M, 2F] [M, F] [M, D]
  size_t p_in_e = (size_t)2 * F * (D / 2), sz_in_e = (size_t)(D / G) * 2 * F * 2;
  size_t p_out_e = (size_t)D * (F / 2), sz_out_e = (size_t)(F / G) * D * 2;
  int a0 = 0;
  for (int e = 0; e < E; e++) {
    int n = (int)counts[e];
    if (!n) continue;
    const uint16_t *xe = x + (size_t)a0 * D;
    if (idx) {
      for (int i = 0; i < n; i++) memcpy(xg + (size_t)i * D, x + (size_t)idx[a0 + i] * D, sizeof(uint16_t) * D);
      xe = xg;
    }
    quantize_rows(xe, n, D, G, xq, xs, xsum);
    mm_quantized(xq, xs, xsum, n, p_in + e * p_in_e, sz_in + e * sz_in_e, 2 * F, D, G, h, threads);
    swiglu_rows(h, w + a0, n, F, act);
    quantize_rows(act, n, F, G, xq, xs, xsum);
    mm_quantized(xq, xs, xsum, n, p_out + e * p_out_e, sz_out + e * sz_out_e, D, F, G, y, threads);
    for (int i = 0; i < n; i++) {
      const uint16_t *yr = y + (size_t)i * D;
      float *o = out + (size_t)(combine ? (idx ? idx[a0 + i] : a0 + i) : a0 + i) * D;
      if (combine)
        for (int d = 0; d < D; d++) o[d] += bf16_to_f32(yr[d]);
      else
        for (int d = 0; d < D; d++) o[d] = bf16_to_f32(yr[d]);
    }
    a0 += n;
  }
  free(buf);
  return 0;
}

// 0: done; 1: shapes the kernel does not take; 2: out of memory.
int moelab_w4a8_mm(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int R, int O, int I, int G,
                   int threads) {
  if (R < 1 || !shapes_fit(O, I, G)) return 1;
  int nb = I / XB, ng = I / G;
  int8_t *xq = malloc((size_t)R * I + 64 + sizeof(float) * (size_t)R * (nb + ng));
  if (!xq) return 2;
  float *xs = (float *)(((uintptr_t)(xq + (size_t)R * I) + 63) & ~(uintptr_t)63);
  float *xsum = xs + (size_t)R * nb;
  quantize_rows(x, R, I, G, xq, xs, xsum);
  mm_quantized(xq, xs, xsum, R, w, sz, O, I, G, y, threads);
  free(xq);
  return 0;
}
