// Per-row math of the CUDA row kernel (the "cuda" backend), shared by the device kernel
// in row_loss_grad.cu and by the host emulation in the test suite.  No torch, no cub here:
// every function is __host__ __device__ and sees the row through (tid, nthreads), so the
// same code runs as one CUDA block per row or as a serial loop over "threads" on a CPU.
//
// For one row of raw logits z0 (length V) and target y (docs/design.md, Math; backends/__init__.py):
//
//   z      = c * tanh(z0 / c)                       (softcap c; else z = z0)
//   pass 1 (online, per thread, then merged across the block):
//     m    = max_j z_j,       argmax = first j with z_j == m
//     r    = sum over all j but one maximal entry of exp(z_j - m)     (so 1 + r = sum exp(z - m))
//     t    = sum_j exp(z_j - m) (m - z_j)  >= 0                        (entropy numerator)
//     S    = sum_j z_j                                                  (label smoothing)
//   epilogue (one thread):
//     lse  = m + log1p(r),  logp = (z_y - m) - log1p(r),  p = exp(logp)
//     H    = t / (1 + r) + log1p(r)             ( = sum_j softmax_j (lse - z_j) )
//     L, g = objective(logp, H);  w = -g
//     L    = (1 - eps) L + eps w (lse - S / V) + lam lse^2,  times the token weight
//   pass 2 (only with a grad_scale), in place:
//     dz0_j = scale * (a softmax_j - b [j == y] - c) * (1 - (z_j / c)^2)
//     a = w + 2 lam lse,  b = w (1 - eps),  c = w eps / V,  scale = token_weight * grad_scale
//   with the target entry a p - b written as a expm1(logp) + (a - b) (exact when p ~ 1)
//   and the cap factor as 1 / cosh(z0 / c)^2 (no cancellation near the cap).
//
// Rows whose target is ignore_index or outside [0, V) get zero outputs and a zero
// gradient row; their target is never used as an index.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DFTK_HD __host__ __device__ __forceinline__
#else
#define DFTK_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define DFTK_UNROLL _Pragma("unroll")
#else
#define DFTK_UNROLL
#endif

namespace dftk {

// Objective kernel ids, as in dft_kernels/objectives.py (Objective.kernel_id).
enum ObjectiveId : int { kCE = 0, kDFT = 1, kPower = 2, kFocal = 3, kChord = 4, kProb = 5, kEntropy = 6, kEAFT = 7 };
constexpr int kNumObjectives = 8;

// Everything a row needs besides its logits.  Pointers are device pointers on the GPU.
struct RowParams {
  int vocab;                   // V
  int64_t row_stride;          // elements between consecutive rows of logits
  int64_t ignore_index;
  int kernel_id;               // ObjectiveId
  float param0, param1;        // Objective.kernel_params
  float softcap;               // 0 = no softcap
  float label_smoothing;       // eps
  float z_loss;                // lam
  const int64_t* target;       // [n]
  const float* token_weights;  // [n] or nullptr
  const float* grad_scale;     // [] or [n]; nullptr = forward only (logits untouched)
  int64_t grad_scale_stride;   // 0 for a scalar grad_scale, 1 for a per-row one
  float* loss;                 // [n] outputs, float32
  float* nll;
  float* prob;
  float* entropy;              // [n] or nullptr (objective does not need H)
  float* correct;              // [n] or nullptr (no stats requested)
};

// ---- element conversions (explicit: torch builds with __CUDA_NO_*_CONVERSIONS__) ----
DFTK_HD float to_float(float x) { return x; }
DFTK_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
DFTK_HD float to_float(__half x) { return __half2float(x); }

template <typename T> struct Convert;
template <> struct Convert<float> { static DFTK_HD float from(float x) { return x; } };
template <> struct Convert<__nv_bfloat16> { static DFTK_HD __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); } };
template <> struct Convert<__half> { static DFTK_HD __half from(float x) { return __float2half_rn(x); } };

// 16 bytes of consecutive elements, loaded and stored as one vector.
template <typename T> struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// Number of leading elements before the first 16-byte boundary of row (at most V).
template <typename T> DFTK_HD int aligned_head(const T* row, int V) {
  const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(row) % 16);
  const int head = misalign == 0 ? 0 : (16 - misalign) / static_cast<int>(sizeof(T));
  return head < V ? head : V;
}

// Calls f(j, z0_j) for the entries thread tid of nthreads owns: a scalar head up to the
// first 16-byte boundary, then 16-byte packs, then a scalar tail.  Indices within one
// thread increase, which the first-index argmax relies on.
template <typename T, typename F> DFTK_HD void visit_row(const T* row, int V, int tid, int nthreads, F& f) {
  constexpr int kVec = Pack<T>::kSize;
  const int head = aligned_head(row, V);
  for (int j = tid; j < head; j += nthreads) f(j, to_float(row[j]));
  const int npacks = (V - head) / kVec;
  const Pack<T>* packs = reinterpret_cast<const Pack<T>*>(row + head);
  for (int k = tid; k < npacks; k += nthreads) {
    const Pack<T> pk = packs[k];
    DFTK_UNROLL
    for (int u = 0; u < kVec; ++u) f(head + k * kVec + u, to_float(pk.v[u]));
  }
  for (int j = head + npacks * kVec + tid; j < V; j += nthreads) f(j, to_float(row[j]));
}

// Same partition as visit_row; row[j] = f(j, z0_j).
template <typename T, typename F> DFTK_HD void transform_row(T* row, int V, int tid, int nthreads, const F& f) {
  constexpr int kVec = Pack<T>::kSize;
  const int head = aligned_head(row, V);
  for (int j = tid; j < head; j += nthreads) row[j] = Convert<T>::from(f(j, to_float(row[j])));
  const int npacks = (V - head) / kVec;
  Pack<T>* packs = reinterpret_cast<Pack<T>*>(row + head);
  for (int k = tid; k < npacks; k += nthreads) {
    Pack<T> pk = packs[k];
    DFTK_UNROLL
    for (int u = 0; u < kVec; ++u) pk.v[u] = Convert<T>::from(f(head + k * kVec + u, to_float(pk.v[u])));
    packs[k] = pk;
  }
  for (int j = head + npacks * kVec + tid; j < V; j += nthreads) row[j] = Convert<T>::from(f(j, to_float(row[j])));
}

DFTK_HD float apply_softcap(float z0, float softcap) { return softcap > 0.f ? softcap * tanhf(z0 / softcap) : z0; }

// ---- pass 1: online statistics and their merge ----
struct RowStats {
  float m;       // running max of z (-inf: nothing seen yet)
  float r;       // sum of exp(z - m) over the entries seen, except one maximal entry
  float t;       // sum of exp(z - m) * (m - z) over the entries seen
  float sum_z;   // sum of z
  int argmax;    // first index of the max
};

DFTK_HD RowStats empty_stats() { return RowStats{-INFINITY, 0.f, 0.f, 0.f, INT_MAX}; }

// Adds entry j with (capped) logit z.  When the max moves from m to z, the old maximal
// entry joins r: r' = (r + 1) e and t' = e (t + (z - m)(1 + r)) with e = exp(m - z).
// Entries equal to -inf contribute nothing (and would give 0 * inf in t).
DFTK_HD void push(RowStats& s, float z, int j) {
  if (z > s.m) {
    if (s.m == -INFINITY) {
      s.r = 0.f;
      s.t = 0.f;
    } else {
      const float e = expf(s.m - z);
      s.t = e * fmaf(z - s.m, 1.f + s.r, s.t);
      s.r = fmaf(s.r, e, e);
    }
    s.m = z;
    s.argmax = j;
  } else if (z != -INFINITY) {
    const float e = expf(z - s.m);
    s.r += e;
    s.t = fmaf(e, s.m - z, s.t);
  }
  s.sum_z += z;
}

// Associative, commutative merge of two partial states (ties: the smaller index wins).
DFTK_HD RowStats merge(RowStats a, RowStats b) {
  if (b.m > a.m || (b.m == a.m && b.argmax < a.argmax)) {
    const RowStats tmp = a;
    a = b;
    b = tmp;
  }
  a.sum_z += b.sum_z;
  if (b.m == -INFINITY) return a;  // b saw nothing (or only -inf)
  const float e = expf(b.m - a.m);
  a.t += e * fmaf(a.m - b.m, 1.f + b.r, b.t);
  a.r += (b.r + 1.f) * e;  // b's excluded maximal entry now counts
  return a;
}

struct PushOp {
  RowStats& s;
  float softcap;
  DFTK_HD void operator()(int j, float z0) { push(s, apply_softcap(z0, softcap), j); }
};

// ---- epilogue ----
// loss and g = dL/dlogp of the objective (objectives.py), from logp and the entropy H.
DFTK_HD void objective_loss_coef(int kernel_id, float param0, float param1, float logp, float p, float H,
                                 float& loss, float& g) {
  switch (kernel_id) {
    case kCE:
      loss = -logp;
      g = -1.f;
      break;
    case kDFT: {  // w = max(p, min_weight)
      const float w = fmaxf(p, param0);
      loss = -w * logp;
      g = -w;
      break;
    }
    case kPower: {  // w = p^alpha
      const float w = expf(param0 * logp);
      loss = -w * logp;
      g = -w;
      break;
    }
    case kFocal: {  // L = -(1-p)^gamma logp, g = -(1-p)^gamma + gamma (1-p)^(gamma-1) p logp
      const float q = -expm1f(logp);
      const float qg = powf(q, param0);  // powf(0, 0) == 1, as torch.pow
      loss = -qg * logp;
      g = -qg;
      if (param0 != 0.f && q > 0.f) g += param0 * powf(q, param0 - 1.f) * p * logp;  // limit 0 at q == 0
      break;
    }
    case kChord: {  // w = p (1 - p)
      const float w = p * -expm1f(logp);
      loss = -w * logp;
      g = -w;
      break;
    }
    case kProb: {  // L = -p^k, g = -k p^k
      const float pk = expf(param0 * logp);
      loss = -pk;
      g = -param0 * pk;
      break;
    }
    case kEntropy: {  // w = scale exp(-H)
      const float w = param0 * expf(-H);
      loss = -w * logp;
      g = -w;
      break;
    }
    default: {  // kEAFT: w = (H / normalizer)^alpha, the exact entropy (the wrapper declines top-k)
      const float w = powf(H / param1, param0);  // powf(0, 0) == 1, as torch.pow
      loss = -w * logp;
      g = -w;
      break;
    }
  }
}

// What pass 2 needs, computed once per row.
struct RowEpilogue {
  float m;            // row max
  float inv_sum;      // 1 / (1 + r)
  float a;            // coefficient of softmax_j
  float c;            // uniform term w eps / V
  float target_grad;  // a p - b - c at the target, before cap factor and scale
  float scale;        // token weight * grad_scale
  int target;
};

DFTK_HD bool valid_target(int64_t y, const RowParams& p) {
  return y != p.ignore_index && y >= 0 && y < static_cast<int64_t>(p.vocab);
}

// Writes the zero outputs of an invalid row.
DFTK_HD void write_invalid_row(const RowParams& p, int64_t row) {
  p.loss[row] = 0.f;
  p.nll[row] = 0.f;
  p.prob[row] = 0.f;
  if (p.entropy) p.entropy[row] = 0.f;
  if (p.correct) p.correct[row] = 0.f;
}

// Epilogue of a valid row: per-token outputs and the pass-2 coefficients.
// z_target is the capped logit of the target.
DFTK_HD RowEpilogue finish_row(const RowStats& s, float z_target, int y, const RowParams& p, int64_t row) {
  const float log1p_r = log1pf(s.r);
  const float lse = s.m + log1p_r;
  const float logp = (z_target - s.m) - log1p_r;
  const float prob = expf(logp);
  const float inv_sum = 1.f / (1.f + s.r);
  const float H = fmaf(s.t, inv_sum, log1p_r);
  float loss, g;
  objective_loss_coef(p.kernel_id, p.param0, p.param1, logp, prob, H, loss, g);
  const float w = -g;
  const float eps = p.label_smoothing, lam = p.z_loss;
  if (eps != 0.f) loss = (1.f - eps) * loss + eps * w * (lse - s.sum_z / static_cast<float>(p.vocab));
  if (lam != 0.f) loss += lam * lse * lse;
  const float weight = p.token_weights ? p.token_weights[row] : 1.f;
  p.loss[row] = loss * weight;
  p.nll[row] = -logp;
  p.prob[row] = prob;
  if (p.entropy) p.entropy[row] = H;
  if (p.correct) p.correct[row] = s.argmax == y ? 1.f : 0.f;

  RowEpilogue e;
  e.m = s.m;
  e.inv_sum = inv_sum;
  const float vocab = static_cast<float>(p.vocab);
  const float zl = 2.f * lam * lse;
  e.a = w + zl;
  e.c = w * (eps / vocab);
  // a p - b - c = a expm1(logp) + (a - b - c) with a - b - c = w eps (V - 1) / V + zl, summed
  // without cancelling the two eps terms (they would, at small V).
  e.target_grad = e.a * expm1f(logp) + fmaf(w * eps, (vocab - 1.f) / vocab, zl);
  e.scale = p.grad_scale ? weight * p.grad_scale[row * p.grad_scale_stride] : 0.f;
  e.target = y;
  return e;
}

// ---- pass 2 ----
struct GradOp {
  RowEpilogue e;
  float softcap;
  DFTK_HD float operator()(int j, float z0) const {
    float g;
    if (j == e.target) {
      g = e.target_grad;
    } else {
      const float z = apply_softcap(z0, softcap);
      g = fmaf(e.a, expf(z - e.m) * e.inv_sum, -e.c);
    }
    if (softcap > 0.f) {
      const float ch = coshf(z0 / softcap);
      g /= ch * ch;
    }
    return g * e.scale;
  }
};

struct ZeroOp {
  DFTK_HD float operator()(int, float) const { return 0.f; }
};

}  // namespace dftk
