// Fused dequantize + GEMV for mqc's packed group-quantized weights: out[M, N] = x[M, K] W^T.
//
// Reference: mqc/kernels/reference.py::qgemv_reference (the result this kernel must match) and
// mqc/quant.py (the layout). Launch parameters come from mqc/kernels/launch.py::plan_launch;
// tests/test_kernels.py emulates this file's index arithmetic on the CPU.
//
// Layout read, exactly as mqc.quant writes it (2/4/8 bit = onnxruntime MatMulNBits):
//   qweight u8 [N, n_blocks, g*b/8]  row r is one little-endian bit stream of n_blocks*g codes,
//                                    code i at bits [i*b, (i+1)*b); 3-bit words of 24 bits hold 8
//                                    codes, so the 3-bit stream is also "code i at bit 3i".
//   scales  f16 [N, n_blocks]        zeros u8 [N, zero_row_bytes], packed per row the same way.
//   K need not be a multiple of g: the last block is padded with code 0; x is 0 there.
//   Outliers (optional): CSR crow i32 [N+1], col i16 or i32 [nnz], values f16 [nnz], added as
//   sum_j values[j] * x[col[j]] in the same launch (before the reduction, so they cost no pass).
//
// Work split: a row's bytes are cut into units of Unit::BYTES, each read with Unit::LOADS vector
// loads of VEC words (VEC = 4 is one 128-bit load; launch.py picks the widest VEC the row length
// allows: 2-bit g32 rows of odd n_blocks are 8-byte multiples only, 3-bit units need 12*VEC bytes).
// A block of THREADS threads is split into slots of 2^slot_shift threads; a slot owns R rows,
// its threads stride over the units of those rows, so every activation value loaded is reused
// for R rows. Per unit and per group: dot = sum x*q and sx = sum x (fp32), then
// acc += s * (dot - z * sx). Codes become floats without int->float conversions (see code_at).
// Sums over the slot: warp shuffles, then shared memory when a slot spans several warps.
//
// Siblings (q/k/v, gate/up) run in one launch of this same kernel: mqc.runtime.fused concatenates
// their packed rows along N (the layout is row-separable), so the grid covers every sibling.
#include "common.cuh"

namespace mqc {

constexpr int THREADS = 128;
constexpr int MIN_BLOCKS = 4;     // per SM: caps registers at 128/thread, keeping 16 warps resident
constexpr int MAX_ROW_SUMS = 16;  // R * M for every M (see rows_per_slot)

// Rows per slot: reusing each converted activation for more rows saves work at small M; at
// larger M the accumulators (R*M of them, twice), or wide 3-bit units (WORDS words per row),
// would crowd out the registers.
__host__ __device__ constexpr int rows_per_slot(int m, int words) { return m <= 2 && words <= 4 ? 4 : 2; }

template <int BITS, int VEC>
struct Unit {
  static_assert(BITS == 2 || BITS == 3 || BITS == 4 || BITS == 8, "2, 3, 4 or 8 bits");
  static constexpr int LOADS = BITS == 3 ? 3 : 1;  // 3-bit: 3 loads = whole 24-bit words
  static constexpr int WORDS = VEC * LOADS;
  static constexpr int BYTES = 4 * WORDS;
  static constexpr int CODES = 32 * WORDS / BITS;
  static constexpr int CHUNKS = CODES / 8;  // 8 codes: one 128-bit load of fp16 activations
  static_assert(CODES % 8 == 0, "a unit holds whole chunks of 8 codes");
};

// Code j of a unit's little-endian bit stream, as an exact float. The code is OR-ed into the
// mantissa of 2^23 (float bits 0x4B000000 | v == 2^23 + v), which avoids the slow int->float
// conversion. Where the code fits in place (bit offset + BITS <= 23) no shift is needed either:
// 2^23 + q * 2^off, times 2^-off, minus 2^(23-off) is q, exact in one FMA. j is a compile-time
// constant after unrolling, so every shift, mask and constant folds.
template <int BITS, int WORDS>
__device__ __forceinline__ float code_at(const unsigned int (&w)[WORDS], int j) {
  constexpr unsigned int MASK = (1u << BITS) - 1u;
  const int bit = j * BITS;
  const int word = bit >> 5;
  const int off = bit & 31;
  if (off + BITS <= 23) {
    const float v = __uint_as_float((w[word] & (MASK << off)) | 0x4B000000u);
    const float inv_step = __uint_as_float(static_cast<unsigned int>(127 - off) << 23);  // 2^-off
    const float bias = __uint_as_float(static_cast<unsigned int>(150 - off) << 23);      // 2^(23-off)
    return fmaf(v, inv_step, -bias);
  }
  unsigned int bits = w[word] >> off;
  if (off + BITS > 32) bits |= w[word + 1] << (32 - off);  // 3-bit codes straddling two words
  return __uint_as_float((bits & MASK) | 0x4B000000u) - 8388608.0f;
}

// Zero point of block `group` from a row of packed zeros (same packing rule as the codes).
template <int BITS>
__device__ __forceinline__ float zero_point(const unsigned char* __restrict__ zrow, int group) {
  if constexpr (BITS == 3) {
    const unsigned char* p = zrow + 3 * (group >> 3);
    const unsigned int word = p[0] | (static_cast<unsigned int>(p[1]) << 8) | (static_cast<unsigned int>(p[2]) << 16);
    return static_cast<float>((word >> (3 * (group & 7))) & 7u);
  } else {
    const int bit = group * BITS;
    return static_cast<float>((zrow[bit >> 3] >> (bit & 7)) & ((1u << BITS) - 1u));
  }
}

// Activations x[kk .. kk+8) of one row as floats; 0 past the end of the row (padded codes).
__device__ __forceinline__ void load_x8(const unsigned short* __restrict__ xrow, int k, int kk, bool aligned,
                                        float (&v)[8]) {
  if (aligned && kk + 8 <= k) {
    const uint4 h = *reinterpret_cast<const uint4*>(xrow + kk);
    half2_to_floats(h.x, v[0], v[1]);
    half2_to_floats(h.y, v[2], v[3]);
    half2_to_floats(h.z, v[4], v[5]);
    half2_to_floats(h.w, v[6], v[7]);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = kk + j < k ? half_to_float(xrow[kk + j]) : 0.0f;
  }
}

template <int BITS, int VEC, int M, bool OUTLIERS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) qgemv(
    const unsigned short* __restrict__ x,       // f16 [M, K]
    const unsigned char* __restrict__ qweight,  // u8  [N, n_blocks, g*BITS/8]
    const unsigned short* __restrict__ scales,  // f16 [N, n_blocks]
    const unsigned char* __restrict__ qzeros,   // u8  [N, zero_row_bytes]
    const int* __restrict__ crow,               // i32 [N+1]          (OUTLIERS only)
    const void* __restrict__ col,               // i16/i32 [nnz]      (OUTLIERS only)
    const unsigned short* __restrict__ values,  // f16 [nnz]          (OUTLIERS only)
    const unsigned short* __restrict__ bias,    // f16 [N] or null
    unsigned short* __restrict__ out,           // f16 [M, N]
    int n, int k, int n_blocks, int group_shift, int zero_row_bytes, int slot_shift, int col_is_int32,
    int x_aligned) {
  using U = Unit<BITS, VEC>;
  constexpr int R = rows_per_slot(M, U::WORDS);
  static_assert(R * M <= MAX_ROW_SUMS, "shared reduction buffer too small");

  const int tpr = 1 << slot_shift;  // threads per slot
  const int lane = threadIdx.x & (tpr - 1);
  const int slot = threadIdx.x >> slot_shift;
  const int row0 = (blockIdx.x * (THREADS >> slot_shift) + slot) * R;
  const size_t row_bytes = (static_cast<size_t>(n_blocks) * BITS << group_shift) >> 3;
  const int units = static_cast<int>(row_bytes / U::BYTES);
  const bool aligned = x_aligned != 0;

  // Rows past N (the last slot of the grid) read row N-1 and are never stored: no divergence.
  int rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = min(row0 + r, n - 1);

  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;

  for (int u = lane; u < units; u += tpr) {
    unsigned int w[R][U::WORDS];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const unsigned char* p = qweight + rows[r] * row_bytes + static_cast<size_t>(u) * U::BYTES;
#pragma unroll
      for (int l = 0; l < U::LOADS; ++l) load_words<VEC>(p + 4 * VEC * l, &w[r][VEC * l]);
    }
    const int code0 = u * U::CODES;
    float dot[R][M], sx[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      sx[m] = 0.0f;
#pragma unroll
      for (int r = 0; r < R; ++r) dot[r][m] = 0.0f;
    }
#pragma unroll
    for (int c = 0; c < U::CHUNKS; ++c) {
      float q[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < 8; ++j) q[r][j] = code_at<BITS>(w[r], 8 * c + j);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xv[8];
        load_x8(x + static_cast<size_t>(m) * k, k, code0 + 8 * c, aligned, xv);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          sx[m] += xv[j];
#pragma unroll
          for (int r = 0; r < R; ++r) dot[r][m] = fmaf(xv[j], q[r][j], dot[r][m]);
        }
      }
      // Fold into acc at the end of each quantization group and of the unit (a unit may span
      // several groups, e.g. 64 codes of 2 bits with g = 32). Uniform: units are aligned.
      const int next = code0 + 8 * (c + 1);
      if (c == U::CHUNKS - 1 || (next & ((1 << group_shift) - 1)) == 0) {
        const int group = (next - 1) >> group_shift;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float s = half_to_float(scales[static_cast<size_t>(rows[r]) * n_blocks + group]);
          const float z = zero_point<BITS>(qzeros + static_cast<size_t>(rows[r]) * zero_row_bytes, group);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            acc[r][m] = fmaf(s, fmaf(-z, sx[m], dot[r][m]), acc[r][m]);
            dot[r][m] = 0.0f;
          }
        }
#pragma unroll
        for (int m = 0; m < M; ++m) sx[m] = 0.0f;
      }
    }
  }

  if constexpr (OUTLIERS) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (row0 + r >= n) continue;
      const int end = crow[row0 + r + 1];
      for (int e = crow[row0 + r] + lane; e < end; e += tpr) {
        const int c = col_is_int32 ? static_cast<const int*>(col)[e] : static_cast<const short*>(col)[e];
        const float v = half_to_float(values[e]);
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = fmaf(v, half_to_float(x[static_cast<size_t>(m) * k + c]), acc[r][m]);
      }
    }
  }

  // Sum over the slot: butterfly within the warp (offsets below tpr stay inside the slot) ...
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1)
        if (offset < tpr) v += __shfl_xor_sync(0xffffffffu, v, offset);
      acc[r][m] = v;
    }
  // ... then across the warps of a slot wider than one warp (tpr is uniform over the block).
  if (tpr > 32) {
    __shared__ float partial[THREADS / 32][MAX_ROW_SUMS];
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) partial[warp][r * M + m] = acc[r][m];
    }
    __syncthreads();
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float t = 0.0f;
          for (int i = 0; i < (tpr >> 5); ++i) t += partial[warp + i][r * M + m];
          acc[r][m] = t;
        }
    }
  }

  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int row = row0 + r;
      if (row >= n) continue;
      const float b = bias != nullptr ? half_to_float(bias[row]) : 0.0f;
#pragma unroll
      for (int m = 0; m < M; ++m) out[static_cast<size_t>(m) * n + row] = float_to_half(acc[r][m] + b);
    }
  }
}

}  // namespace mqc
