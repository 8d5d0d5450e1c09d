// y = x W^T for int4 W in torch's blocked CPU packing, with x rounded to int8 (W4A8):
// the integer products are summed by AVX512-VNNI (vpdpbusd, 64 multiply-adds an
// instruction), as llama.cpp's q4_0 x q8_0 dot products are. Built and loaded by
// moelab/quant/vnni.py, which holds the reference (`reference_w4a8_mm`) and the rules
// for when this runs; read that docstring first.
//
// Inputs (the layout `moelab.quant.experts` documents and checks once per process):
//   x   [R, I]     bf16 activations
//   w   [O, I/2]   uint8: 64-row blocks; block b's bytes are [I, 32], byte (k, j) holds
//                  input k of row 64b + j (low nibble) and of row 64b + 32 + j (high)
//   sz  [I/G, O, 2] bf16: (scale, zero) per group and row; W = (q - 8) * scale + zero
//   y   [R, O]     bf16 out (float32 sums, rounded to nearest even once)
//
// The maths: x is rounded to int8 per block of 32 inputs, x_k ~ s_b * xq_k (symmetric,
// s_b = max|x| / 127). Per group g of G inputs and row o, with m = zero - 8 * scale the
// value of nibble 0:
//   sum_k W_ok x_k  ~  scale_og * sum_b s_b * (sum_{k in b} q_ok * xq_k)  +  m_og * sum_{k in g} s_b xq_k
// The inner sums are exact int32 (q in [0, 15], |xq| <= 127). So the only rounding
// beyond the weights' own is that of x to int8, and of the float32 sums.
//
// Vectorisation: 4 consecutive inputs of the 64 rows of a block are 128 bytes (2 zmm).
// Two byte permutes (vpermt2b, AVX512-VBMI) turn them into one 32-bit lane per row
// holding its 4 inputs' bytes, the low and high nibbles are masked out, and vpdpbusd
// multiplies each lane's 4 nibbles by the 4 int8 inputs (one broadcast 32-bit word) into
// 16 rows' int32 sums: 4 zmm of sums cover the block's 64 rows, so no horizontal sums.

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64  // output rows per packing block
#define XB 32     // inputs per activation scale
#define RB 2      // activation rows per pass over a block (registers: 3 x 4 zmm a row)

static inline __m512 bf16x16_to_ps(const uint16_t *p) {
  __m256i h = _mm256_loadu_si256((const __m256i *)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Round to nearest even, as torch's float -> bf16 conversion does (NaN stays NaN).
static inline void ps_to_bf16x16(uint16_t *p, __m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
}

// x -> xq [R, I] int8, xs [R, I/32] scales, xsum [R, I/G] the groups' sums of s_b * xq.
static void quantize_rows(const uint16_t *x, int R, int I, int G, int8_t *xq, float *xs, float *xsum) {
  int nb = I / XB, ng = I / G, bpg = G / XB;
  for (int r = 0; r < R; r++) {
    for (int g = 0; g < ng; g++) xsum[(size_t)r * ng + g] = 0.f;
    for (int b = 0; b < nb; b++) {
      const uint16_t *xb = x + (size_t)r * I + XB * b;
      __m512 v0 = bf16x16_to_ps(xb), v1 = bf16x16_to_ps(xb + 16);
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      float inv = amax > 0.f ? 127.f / amax : 0.f;
      __m512 iv = _mm512_set1_ps(inv);
      // cvtps rounds to nearest even (the default MXCSR mode), as torch.round does
      __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, iv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, iv));
      _mm_storeu_si128((__m128i *)(xq + (size_t)r * I + XB * b), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128((__m128i *)(xq + (size_t)r * I + XB * b + 16), _mm512_cvtepi32_epi8(q1));
      float s = amax / 127.f;
      xs[(size_t)r * nb + b] = s;
      xsum[(size_t)r * ng + b / bpg] += s * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
  }
}

// Block b (output rows o0 .. o0 + 63) against activation rows r0 .. r0 + rb - 1.
static inline void block_rows(const uint8_t *wb, const uint16_t *sz, int O, int o0, int I, int G, const int8_t *xq,
                              const float *xs, const float *xsum, int r0, int rb, uint16_t *y, __m512i idx0,
                              __m512i idx1) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
  int nb = I / XB, ng = I / G, bpg = G / XB;
  __m512 acc[RB][4];  // [row][quarter q: output rows o0 + 16q .. + 15]
  for (int i = 0; i < RB; i++)
    for (int q = 0; q < 4; q++) acc[i][q] = _mm512_setzero_ps();
  for (int g = 0; g < ng; g++) {
    __m512 gacc[RB][4];  // this group's sum_b s_b * (int32 sums of block b)
    for (int i = 0; i < RB; i++)
      for (int q = 0; q < 4; q++) gacc[i][q] = _mm512_setzero_ps();
    for (int bb = 0; bb < bpg; bb++) {
      int blk = g * bpg + bb;
      __m512i isum[RB][4];
      for (int i = 0; i < RB; i++)
        for (int q = 0; q < 4; q++) isum[i][q] = _mm512_setzero_si512();
      for (int k = XB * blk; k < XB * (blk + 1); k += 4) {
        const uint8_t *p = wb + (size_t)k * 32;
        __m512i a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + 64);
        // lane j of t0: rows j and 32 + j, inputs k .. k + 3; of t1: rows 16 + j and 48 + j
        __m512i t0 = _mm512_permutex2var_epi8(a, idx0, b), t1 = _mm512_permutex2var_epi8(a, idx1, b);
        __m512i n[4] = {_mm512_and_si512(t0, nib), _mm512_and_si512(t1, nib),
                        _mm512_and_si512(_mm512_srli_epi16(t0, 4), nib),
                        _mm512_and_si512(_mm512_srli_epi16(t1, 4), nib)};
        for (int i = 0; i < rb; i++) {
          int32_t word;
          memcpy(&word, xq + (size_t)(r0 + i) * I + k, 4);
          __m512i xw = _mm512_set1_epi32(word);
          for (int q = 0; q < 4; q++) isum[i][q] = _mm512_dpbusd_epi32(isum[i][q], n[q], xw);
        }
      }
      for (int i = 0; i < rb; i++) {
        __m512 s = _mm512_set1_ps(xs[(size_t)(r0 + i) * nb + blk]);
        for (int q = 0; q < 4; q++) gacc[i][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i][q]), s, gacc[i][q]);
      }
    }
    for (int q = 0; q < 4; q++) {
      // 16 rows' (scale, zero) bf16 pairs: one 32-bit lane a row, scale in the low half
      __m512i v = _mm512_loadu_si512(sz + ((size_t)g * O + o0 + 16 * q) * 2);
      __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(v, hi16));
      __m512 m = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), scale, zero);
      for (int i = 0; i < rb; i++) {
        acc[i][q] = _mm512_fmadd_ps(gacc[i][q], scale, acc[i][q]);
        acc[i][q] = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[(size_t)(r0 + i) * ng + g]), acc[i][q]);
      }
    }
  }
  for (int i = 0; i < rb; i++)
    for (int q = 0; q < 4; q++) ps_to_bf16x16(y + (size_t)(r0 + i) * O + o0 + 16 * q, acc[i][q]);
}

static void permute_indices(__m512i *idx0, __m512i *idx1) {
  int8_t i0[64], i1[64];  // dest byte 4j + t <- input k + t of row j (of 16 + j), in a:b
  for (int j = 0; j < 16; j++)
    for (int t = 0; t < 4; t++) {
      i0[4 * j + t] = (int8_t)(32 * t + j);
      i1[4 * j + t] = (int8_t)(32 * t + 16 + j);
    }
  *idx0 = _mm512_loadu_si512(i0);
  *idx1 = _mm512_loadu_si512(i1);
}

// y [R, O] bf16 = the rows already rounded to int8 (xq, xs, xsum) times W.
static void mm_quantized(const int8_t *xq, const float *xs, const float *xsum, int R, const uint8_t *w,
                         const uint16_t *sz, int O, int I, int G, uint16_t *y, int threads) {
  __m512i idx0, idx1;
  permute_indices(&idx0, &idx1);
  int nblk = O / BLOCK;
  // The OpenMP runtime is torch's own (libgomp.so.1, already loaded: one thread pool).
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && nblk >= 2 * threads)
  for (int b = 0; b < nblk; b++)
    for (int r0 = 0; r0 < R; r0 += RB)
      block_rows(w + (size_t)b * BLOCK * (I / 2), sz, O, BLOCK * b, I, G, xq, xs, xsum, r0,
                 R - r0 < RB ? R - r0 : RB, y, idx0, idx1);
}

#include "int4_shared.h"  // moelab_w4a8_mm and the one-call layer, on the functions above
