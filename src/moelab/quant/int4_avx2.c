// y = x W^T for int4 W in torch's blocked CPU packing *of an AVX2 build*, with x rounded
// to int8 (W4A8): the AVX2 twin of int4_vnni.c, for CPUs without AVX512 (Zen 2/3, Intel
// before Ice Lake), where torch packs int4 weights in 32-row blocks. Same maths, same
// contract, same reference (`moelab.quant.vnni.reference_w4a8_mm`); read int4_vnni.c's
// header first. What differs:
//
//   w   [O, I/2]   uint8: 32-row blocks; block b's bytes are [I, 16], byte (k, j) holds
//                  input k of row 32b + j (low nibble) and of row 32b + 16 + j (high)
//
// Vectorisation: AVX2 has no VNNI, so the integer products are vpmaddubsw (unsigned
// nibble x signed int8, adjacent pairs summed into int16), as llama.cpp's AVX2 q4_0 dot
// product does. Two consecutive inputs of a block's 32 rows are 32 bytes; a qword permute
// and a byte shuffle put each row's two inputs side by side (16 rows a register, in
// order), the low and high nibbles give rows j and 16 + j, and vpmaddubsw multiplies them
// by the two int8 inputs (one broadcast 16-bit word). A pair sums to at most
// 2 * 15 * 127 = 3810, so 8 pairs (16 inputs) fit int16 exactly; then the sums widen to
// int32.

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32  // output rows per packing block
#define XB 32     // inputs per activation scale
#define RB 2      // activation rows per pass over a block

static inline __m256 bf16x8_to_ps(const uint16_t *p) {
  __m128i h = _mm_loadu_si128((const __m128i *)p);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Round to nearest even, as torch's float -> bf16 conversion does (NaN stays NaN).
static inline void ps_to_bf16x8(uint16_t *p, __m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  // r is in [0, 0xffff]: the unsigned-saturating pack keeps it
  _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

static inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

static inline int hsum8_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// x -> xq [R, I] int8, xs [R, I/32] scales, xsum [R, I/G] the groups' sums of s_b * xq.
static void quantize_rows(const uint16_t *x, int R, int I, int G, int8_t *xq, float *xs, float *xsum) {
  int nb = I / XB, ng = I / G, bpg = G / XB;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int r = 0; r < R; r++) {
    for (int g = 0; g < ng; g++) xsum[(size_t)r * ng + g] = 0.f;
    for (int b = 0; b < nb; b++) {
      const uint16_t *xb = x + (size_t)r * I + XB * b;
      __m256 v[4];
      __m256 m = _mm256_setzero_ps();
      for (int t = 0; t < 4; t++) {
        v[t] = bf16x8_to_ps(xb + 8 * t);
        m = _mm256_max_ps(m, _mm256_and_ps(v[t], absmask));
      }
      float amax = hmax8(m);
      float inv = amax > 0.f ? 127.f / amax : 0.f;
      __m256 iv = _mm256_set1_ps(inv);
      __m256i q[4];
      // cvtps rounds to nearest even (the default MXCSR mode), as torch.round does
      for (int t = 0; t < 4; t++) q[t] = _mm256_cvtps_epi32(_mm256_mul_ps(v[t], iv));
      // the packs interleave by 128-bit lane; the dword permute puts the 32 bytes in order
      __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256((__m256i *)(xq + (size_t)r * I + XB * b), _mm256_permutevar8x32_epi32(p, order));
      float s = amax / 127.f;
      xs[(size_t)r * nb + b] = s;
      __m256i qs = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      xsum[(size_t)r * ng + b / bpg] += s * (float)hsum8_epi32(qs);
    }
  }
}

// int16 sums of 16 rows -> added to two int32 registers of 8 rows each, in order.
static inline void widen_add(__m256i s16, __m256i *lo, __m256i *hi) {
  *lo = _mm256_add_epi32(*lo, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s16)));
  *hi = _mm256_add_epi32(*hi, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s16, 1)));
}

// Block b (output rows o0 .. o0 + 31) against activation rows r0 .. r0 + rb - 1.
static inline void block_rows(const uint8_t *wb, const uint16_t *sz, int O, int o0, int I, int G, const int8_t *xq,
                              const float *xs, const float *xsum, int r0, int rb, uint16_t *y) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i hi16 = _mm256_set1_epi32((int)0xFFFF0000u);
  // per 128-bit lane: bytes [input k: rows 0-7 | input k + 1: rows 0-7] -> row by row pairs
  const __m256i pairs = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
                                         0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  int nb = I / XB, ng = I / G, bpg = G / XB;
  float acc[RB][BLOCK];
  memset(acc, 0, sizeof(acc));
  for (int g = 0; g < ng; g++) {
    __m256 gacc[RB][4];  // this group's sum_b s_b * (int32 sums of block b); [row][rows 8q .. 8q + 7]
    for (int i = 0; i < RB; i++)
      for (int q = 0; q < 4; q++) gacc[i][q] = _mm256_setzero_ps();
    for (int bb = 0; bb < bpg; bb++) {
      int blk = g * bpg + bb;
      __m256i isum[RB][4];
      for (int i = 0; i < RB; i++)
        for (int q = 0; q < 4; q++) isum[i][q] = _mm256_setzero_si256();
      for (int half = 0; half < 2; half++) {
        __m256i s16[RB][2];  // [row][rows 0-15 (low nibbles) / 16-31 (high)]
        for (int i = 0; i < RB; i++) s16[i][0] = s16[i][1] = _mm256_setzero_si256();
        for (int k = XB * blk + 16 * half; k < XB * blk + 16 * (half + 1); k += 2) {
          __m256i a = _mm256_loadu_si256((const __m256i *)(wb + (size_t)k * 16));
          __m256i t = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(a, 0xD8), pairs);
          __m256i lo = _mm256_and_si256(t, nib), hi = _mm256_and_si256(_mm256_srli_epi16(t, 4), nib);
          for (int i = 0; i < rb; i++) {
            int16_t word;
            memcpy(&word, xq + (size_t)(r0 + i) * I + k, 2);
            __m256i xw = _mm256_set1_epi16(word);
            s16[i][0] = _mm256_add_epi16(s16[i][0], _mm256_maddubs_epi16(lo, xw));
            s16[i][1] = _mm256_add_epi16(s16[i][1], _mm256_maddubs_epi16(hi, xw));
          }
        }
        for (int i = 0; i < rb; i++) {
          widen_add(s16[i][0], &isum[i][0], &isum[i][1]);
          widen_add(s16[i][1], &isum[i][2], &isum[i][3]);
        }
      }
      for (int i = 0; i < rb; i++) {
        __m256 s = _mm256_set1_ps(xs[(size_t)(r0 + i) * nb + blk]);
        for (int q = 0; q < 4; q++) gacc[i][q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i][q]), s, gacc[i][q]);
      }
    }
    for (int q = 0; q < 4; q++) {
      // 8 rows' (scale, zero) bf16 pairs: one 32-bit lane a row, scale in the low half
      __m256i v = _mm256_loadu_si256((const __m256i *)(sz + ((size_t)g * O + o0 + 8 * q) * 2));
      __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(v, hi16));
      __m256 m = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), scale, zero);
      for (int i = 0; i < rb; i++) {
        __m256 a = _mm256_fmadd_ps(gacc[i][q], scale, _mm256_loadu_ps(acc[i] + 8 * q));
        a = _mm256_fmadd_ps(m, _mm256_set1_ps(xsum[(size_t)(r0 + i) * ng + g]), a);
        _mm256_storeu_ps(acc[i] + 8 * q, a);
      }
    }
  }
  for (int i = 0; i < rb; i++)
    for (int q = 0; q < 4; q++) ps_to_bf16x8(y + (size_t)(r0 + i) * O + o0 + 8 * q, _mm256_loadu_ps(acc[i] + 8 * q));
}

// y [R, O] bf16 = the rows already rounded to int8 (xq, xs, xsum) times W.
static void mm_quantized(const int8_t *xq, const float *xs, const float *xsum, int R, const uint8_t *w,
                         const uint16_t *sz, int O, int I, int G, uint16_t *y, int threads) {
  int nblk = O / BLOCK;
  // The OpenMP runtime is torch's own (libgomp.so.1, already loaded: one thread pool).
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && nblk >= 2 * threads)
  for (int b = 0; b < nblk; b++)
    for (int r0 = 0; r0 < R; r0 += RB)
      block_rows(w + (size_t)b * BLOCK * (I / 2), sz, O, BLOCK * b, I, G, xq, xs, xsum, r0,
                 R - r0 < RB ? R - r0 : RB, y);
}

#include "int4_shared.h"  // moelab_w4a8_mm and the one-call layer, on the functions above
