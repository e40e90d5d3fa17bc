// Small device helpers shared by mqc's kernels.
//
// The kernels are compiled by NVRTC through CuPy, where no CUDA headers are on the include path,
// so nothing here includes <cuda_fp16.h>: fp16 values travel as their raw 16 bits and are
// converted with the PTX instructions that cuda_fp16.h itself wraps (cvt.f32.f16 / cvt.rn.f16.f32).
#pragma once

namespace mqc {

__device__ __forceinline__ float half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// The two fp16 values of a 32-bit word, lower address first (little-endian).
__device__ __forceinline__ void half2_to_floats(unsigned int w, float& lo, float& hi) {
  lo = half_to_float(static_cast<unsigned short>(w & 0xffffu));
  hi = half_to_float(static_cast<unsigned short>(w >> 16));
}

// VEC consecutive 32-bit words from a 4*VEC-byte aligned address, in one vector load. Packed
// weights are read exactly once, so the load is marked streaming (evict-first) to leave L1/L2
// to the activations, which every row re-reads.
template <int VEC>
__device__ __forceinline__ void load_words(const unsigned char* p, unsigned int* w) {
  if constexpr (VEC == 4) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else if constexpr (VEC == 2) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
    w[0] = v.x; w[1] = v.y;
  } else {
    static_assert(VEC == 1, "VEC must be 1, 2 or 4 words");
    w[0] = __ldcs(reinterpret_cast<const unsigned int*>(p));
  }
}

}  // namespace mqc
