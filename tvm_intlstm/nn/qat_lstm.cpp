// Fused QAT LSTM direction: the whole time loop of QuantLSTM.forward_fake (tvm_intlstm/nn/modules.py)
// in one forward and one backward call, built at first use by tvm_intlstm/nn/qat_fast.py.
//
// Forward values are the loop path's values bit for bit: the same float32 operations in the same
// order (fake quantization = clamp, x / s, round half to even, * s, xc + (q - xc); the PWL tables
// evaluated as v[idx] + a[idx] * (xc - k[idx]); the recurrent product exact, as RecurrentProduct in
// fake_quant.py). Compile with -ffp-contract=off and without -ffast-math so that nothing is fused or
// reordered.
// Gradients are the loop path's autograd gradients: straight-through fake quantization (1 inside the
// range, 1/2 where torch.minimum/maximum tie at a bound, 0 outside), the PWL slope of the active piece,
// clamp masks inclusive of the bounds; products are formed in autograd's order where it matters, so
// they agree to float rounding (only summation orders differ).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

#ifdef __AVX512F__
constexpr int L = 16;                              // elements per vector chunk (one register)
#else
constexpr int L = 8;
#endif
constexpr float kQ15 = 1.0f / 32768.0f;            // gate / activation scale
constexpr float kQ15Lo = -1.0f, kQ15Hi = 32767.0f / 32768.0f;

typedef float vf __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));
static_assert(sizeof(vf) == L * sizeof(float), "vector chunk");
#if defined(__AVX512F__) || defined(__AVX2__)
constexpr bool kPermute = true;   // one vpermps per table lookup when the table fits a register
#else
constexpr bool kPermute = false;
#endif

struct Table {  // packed float32 [3, n+1]: knots (n+1); bases (n, padded); slopes (n, padded)
  const float* k;
  const float* v;
  const float* a;
  int64_t n;
  vf vk, vv, va;  // the first L knots, bases, slopes (used when n <= L)
  explicit Table(const at::Tensor& t) {
    n = t.size(1) - 1;
    k = t.data_ptr<float>();
    v = k + (n + 1);
    a = v + (n + 1);
    float bk[L] = {}, bv[L] = {}, ba[L] = {};
    for (int64_t i = 0; i < std::min<int64_t>(n, L); ++i) {
      bk[i] = k[i];
      bv[i] = v[i];
      ba[i] = a[i];
    }
    std::memcpy(&vk, bk, sizeof(vf));
    std::memcpy(&vv, bv, sizeof(vf));
    std::memcpy(&va, ba, sizeof(vf));
  }
};

// torch.minimum(x, hi) then torch.maximum(., lo): value and straight-through factor (ties give 1/2)
static inline float clip_st(float x, float lo, float hi, float& d) {
  float m1 = x < hi ? x : hi;
  float d1 = x < hi ? 1.0f : (x == hi ? 0.5f : 0.0f);
  float xc = m1 > lo ? m1 : lo;
  float d2 = m1 > lo ? 1.0f : (m1 == lo ? 0.5f : 0.0f);
  d = d1 * d2;
  return xc;
}

// fake_quant: xc + (round(xc / s) * s - xc). For a power-of-two s, xc / s == xc * (1 / s) exactly.
static inline float fq(float x, float s, float lo, float hi, float& d) {
  float xc = clip_st(x, lo, hi, d);
  float q = std::nearbyint(xc / s) * s;
  return xc + (q - xc);
}
static inline float fq2(float x, float s, float inv_s, float lo, float hi, float& d) {  // s = 2^k
  float xc = clip_st(x, lo, hi, d);
  float q = std::nearbyint(xc * inv_s) * s;
  return xc + (q - xc);
}

// FloatPWL over a chunk before its final clamp (act_q15): y, the input clip's factor and the piece
// index (dy/dx = slope[idx] * factor). The piece search keeps its
// running selections in vector registers (GCC/Clang vector extensions; split into narrower vectors
// where the machine has no 64-byte ones), as a loop over pieces through memory would serialise.

static inline void pwl_chunk(const float* x, const Table& t, float* y, float* dd_out, int32_t* idx_out) {
  vf xv, dd;
  {
    float xc[L], d[L];
    for (int l = 0; l < L; ++l) xc[l] = clip_st(x[l], t.k[0], t.k[t.n], d[l]);
    std::memcpy(&xv, xc, sizeof(vf));
    std::memcpy(&dd, d, sizeof(vf));
  }
  vf zero = {};
  vf vv, aa, kk;
  vi cnt = {};  // piece index = #{p >= 1 : k_p <= xc} (searchsorted, right)
  if (kPermute && t.n <= L) {  // then a lane permute of the tables
    for (int64_t p = 1; p < t.n; ++p) cnt -= (xv >= t.k[p]);
    vv = __builtin_shuffle(t.vv, cnt);
    aa = __builtin_shuffle(t.va, cnt);
    kk = __builtin_shuffle(t.vk, cnt);
  } else {
    vv = zero + t.v[0], aa = zero + t.a[0], kk = zero + t.k[0];
    for (int64_t p = 1; p < t.n; ++p) {  // the last piece whose knot is <= xc
      const float kp = t.k[p];
      vi s = xv >= kp;
      cnt -= s;
      vv = s ? zero + t.v[p] : vv;
      aa = s ? zero + t.a[p] : aa;
      kk = s ? zero + kp : kk;
    }
  }
  vf vr = vv + aa * (xv - kk);
  std::memcpy(y, &vr, sizeof(vf));
  std::memcpy(dd_out, &dd, sizeof(vf));
  std::memcpy(idx_out, &cnt, sizeof(vf));
}

// FloatPWL's clamp to [-1, 32767/32768] then fake_quant(., 2^-15, -32768, 32767), whose bounds are the
// same: one clip gives both values and the product of their factors (outside 0; at a bound the
// clamp passes 1 and the fake quant's tie 1/2; inside 1)
static inline float act_q15(float v, float& d) {
  float xc = clip_st(v, kQ15Lo, kQ15Hi, d);
  float q = std::nearbyint(xc * 32768.0f) * kQ15;
  return xc + (q - xc);
}

// fake_quant with bounds the argument cannot reach (|f c_{t-1}| <= 32768 s_c and |i g| <= 1 < 2^31 s_c)
static inline float fq_open(float x, float s, float inv_s) {
  float q = std::nearbyint(x * inv_s) * s;
  return x + (q - x);
}

struct Consts {
  float gs, gs_lo, gs_hi;   // gate-domain fake quant (2^-12, [-32768, 32767]): input part and recurrent product
  float z_lo, z_hi;         // gate pre-activation clamp [-8, 8 - 2^-12]
  float cs, big_lo, big_hi; // cell grid 2^-cell_frac; products' (never reached) bounds +-2^31 cs
  float c_lo, c_hi;         // cell saturation [-32768 cs, 32767 cs]
  float hs, h_lo, h_hi;     // hidden output scale and [-128 hs, 127 hs]
};

// straight-through factors 0, 1/2, 1 as 2-bit codes; products of such factors (0, 1/4, 1/2, 1) as code4
static inline int code(float d) { return d == 1.0f ? 2 : (d == 0.5f ? 1 : 0); }
static inline float decode(int c) { return 0.5f * (float)c; }
static inline int code4(float d) { return d == 1.0f ? 3 : (d == 0.5f ? 2 : (d == 0.25f ? 1 : 0)); }
static inline float decode4(int c) { return c == 3 ? 1.0f : (c == 2 ? 0.5f : (c == 1 ? 0.25f : 0.0f)); }

// Saved for backward, per step and batch row (22 bytes a unit; every value is exact in its integer
// form: gates and tanh(c) on the 2^-15 grid, c on the 2^-cell_frac grid):
//   gq [4H] int16: i, f, g, o * 2^15
//   gi [4H] int16: bits 0-1 recurrent-product factor, 2-3 input-part factor, 4-5 d gate / d z factor
//                  (PWL input clip x output clip/tie x z clamp), 8-14 PWL piece (d gate / dz = slope * factor)
//   cq [H] int16: c / 2^-cell_frac;  tq [H] int16: tanh_c(c) * 2^15
//   ci [H] int16: bits 0-1 h fake-quant factor, bit 2 cell clamp, 4-5 tanh_c factor, 8-14 its PWL piece

struct RowOut {  // per batch row of one step
  float* h;          // [H] hidden output (float, on the s_h grid)
  int8_t* hq;        // [H] its integer value (next step's recurrent product)
  float* c;          // [H] cell state out
  int16_t* gq;       // saved (above), or null
  int16_t* gi;
  int16_t* cq;
  int16_t* tq;
  int16_t* ci;
};

// one step of one batch row: p = input part (before fake quant), acc = integer recurrent product, m = its
// per-gate-row scale s_h * s_w, cprev = c_{t-1}. Works on chunks of L units; loads and stores take the
// tail's length, the arithmetic always runs on L lanes (so it compiles to straight vector code).
static void step_row(const Consts& K, const Table& sig, const Table& tnh, const Table& tnc, int64_t H,
                     const float* p, const int32_t* acc, const float* m, const float* cprev, const RowOut& o,
                     bool save) {
  const float inv_gs = 1.0f / K.gs, inv_cs = 1.0f / K.cs;
  // local restrict copies: stores through these cannot alias each other or the RowOut fields
  float* __restrict o_h = o.h;
  int8_t* __restrict o_hq = o.hq;
  float* __restrict o_c = o.c;
  int16_t* __restrict o_gq = o.gq;
  int16_t* __restrict o_gi = o.gi;
  int16_t* __restrict o_cq = o.cq;
  int16_t* __restrict o_tq = o.tq;
  int16_t* __restrict o_ci = o.ci;
  for (int64_t j0 = 0; j0 < H; j0 += L) {
    const int len = (int)std::min<int64_t>(L, H - j0);
    float z[4][L], mz[4][L], act[4][L], dd[4][L];
    int32_t idx[4][L], mk[4][L];
    for (int gi = 0; gi < 4; ++gi) {
      const int64_t off = gi * H + j0;
      float pv[L], av[L];
      if (len == L) {
        for (int l = 0; l < L; ++l) pv[l] = p[off + l];
      } else {
        for (int l = 0; l < L; ++l) pv[l] = l < len ? p[off + l] : 0.0f;
      }
      if (acc && len == L) {
        for (int l = 0; l < L; ++l) av[l] = (float)acc[off + l] * m[off + l];
      } else {
        for (int l = 0; l < L; ++l) av[l] = (acc && l < len) ? (float)acc[off + l] * m[off + l] : 0.0f;
      }
      for (int l = 0; l < L; ++l) {
        float dx, dm;
        float gx = fq2(pv[l], K.gs, inv_gs, K.gs_lo, K.gs_hi, dx);
        float gh = fq2(av[l], K.gs, inv_gs, K.gs_lo, K.gs_hi, dm);
        float zs = gx + gh;
        mk[gi][l] = code(dm) | (code(dx) << 2);
        mz[gi][l] = (zs >= K.z_lo && zs <= K.z_hi) ? 1.0f : 0.0f;
        float zc = zs < K.z_lo ? K.z_lo : zs;
        z[gi][l] = zc > K.z_hi ? K.z_hi : zc;
      }
      pwl_chunk(z[gi], gi == 2 ? tnh : sig, act[gi], dd[gi], idx[gi]);
      for (int l = 0; l < L; ++l) {
        float dq;
        act[gi][l] = act_q15(act[gi][l], dq);
        dd[gi][l] = dd[gi][l] * dq * mz[gi][l];
      }
    }
    float cp[L], c[L], mc[L], tc[L], dt[L], mh[L], hv[L];
    int32_t tidx[L];
    int8_t kv[L];
    if (len == L) {
      for (int l = 0; l < L; ++l) cp[l] = cprev[j0 + l];
    } else {
      for (int l = 0; l < L; ++l) cp[l] = l < len ? cprev[j0 + l] : 0.0f;
    }
    for (int l = 0; l < L; ++l) {
      float fc = fq_open(act[1][l] * cp[l], K.cs, inv_cs);
      float ig = fq_open(act[0][l] * act[2][l], K.cs, inv_cs);
      float s = fc + ig;
      mc[l] = (s >= K.c_lo && s <= K.c_hi) ? 1.0f : 0.0f;
      float sc0 = s < K.c_lo ? K.c_lo : s;
      c[l] = sc0 > K.c_hi ? K.c_hi : sc0;
    }
    pwl_chunk(c, tnc, tc, dt, tidx);
    for (int l = 0; l < L; ++l) {
      float dq, dhq;
      tc[l] = act_q15(tc[l], dq);
      dt[l] = dt[l] * dq;
      float x = act[3][l] * tc[l];
      float xc = clip_st(x, K.h_lo, K.h_hi, dhq);
      float k = std::nearbyint(xc / K.hs);
      hv[l] = xc + (k * K.hs - xc);   // fake_quant(o * tc, s_h, -128, 127)
      kv[l] = (int8_t)k;
      mh[l] = dhq;
    }
    for (int l = 0; l < len; ++l) {
      o_h[j0 + l] = hv[l];
      o_hq[j0 + l] = kv[l];
      o_c[j0 + l] = c[l];
    }
    if (save) {
      for (int gi = 0; gi < 4; ++gi) {
        int16_t q[L], inf[L];
        for (int l = 0; l < L; ++l) {
          q[l] = (int16_t)std::nearbyint(act[gi][l] * 32768.0f);
          inf[l] = (int16_t)(mk[gi][l] | (code4(dd[gi][l]) << 4) | (idx[gi][l] << 8));
        }
        const int64_t off = gi * H + j0;
        for (int l = 0; l < len; ++l) {
          o_gq[off + l] = q[l];
          o_gi[off + l] = inf[l];
        }
      }
      int16_t cqv[L], tqv[L], civ[L];
      for (int l = 0; l < L; ++l) {
        cqv[l] = (int16_t)std::nearbyint(c[l] * inv_cs);
        tqv[l] = (int16_t)std::nearbyint(tc[l] * 32768.0f);
        civ[l] = (int16_t)(code(mh[l]) | ((mc[l] != 0.0f) << 2) | (code4(dt[l]) << 4) | (tidx[l] << 8));
      }
      for (int l = 0; l < len; ++l) {
        o_cq[j0 + l] = cqv[l];
        o_tq[j0 + l] = tqv[l];
        o_ci[j0 + l] = civ[l];
      }
    }
  }
}

static Consts make_consts(const std::vector<double>& k) {
  TORCH_CHECK(k.size() == 13, "qat_lstm: expected 13 constants");
  Consts K;
  float* p = &K.gs;
  for (int i = 0; i < 13; ++i) p[i] = (float)k[i];
  return K;
}

static int64_t grain(int64_t H) { return std::max<int64_t>(1, 2048 / std::max<int64_t>(1, 4 * H)); }

// x [M, K] @ w^T for w [N, K] (views allowed) through oneDNN (mkldnn::_linear_pointwise, about 1.5x
// MKL's sgemm at these shapes on AVX-512 machines) where torch has it, else at::mm. Used for the
// backward's float products only: forward values never depend on it.
static at::Tensor linear_nt(const at::Tensor& x, const at::Tensor& w) {
  static const c10::OperatorHandle* op = []() -> const c10::OperatorHandle* {
    auto h = c10::Dispatcher::singleton().findOp(c10::OperatorName("mkldnn::_linear_pointwise", ""));
    return h ? new c10::OperatorHandle(*h) : nullptr;
  }();
  static bool ok = op != nullptr;
  if (ok) {
    try {
      torch::jit::Stack st{x, w, c10::IValue(), std::string("none"), c10::List<std::optional<at::Scalar>>(),
                           c10::IValue()};
      op->callBoxed(&st);
      return st[0].toTensor();
    } catch (const std::exception&) {
      ok = false;  // e.g. an unsupported layout: use BLAS from now on
    }
  }
  return at::mm(x, w.t());
}

// exact integer recurrent product hq [B, H] x q^T (q int8 [4H, H]) into acc int32 [B, 4H]: oneDNN's s8
// GEMM (at::_int_mm; it is wrong for an inner dimension of 1, hence H >= 8), else, or where a torch
// build has no CPU _int_mm, a float64 product (exact: |sum| < 2^53)
static void int_product(at::Tensor& acc, const at::Tensor& hq, const at::Tensor& q) {
  static bool int_mm_ok = true;
  if (int_mm_ok && q.size(1) >= 8) {
    try {
      at::_int_mm_out(acc, hq, q.t());
      return;
    } catch (const std::exception&) {
      int_mm_ok = false;
    }
  }
  acc.copy_(at::mm(hq.to(at::kDouble), q.to(at::kDouble).t()));
}

// Forward of one direction. p [T, B, 4H]: input part x W_x^T + b before its fake quantization;
// q int8 [4H, H]: the recurrent weight's integers; m [4H] = s_h * s_w (float32).
// Returns y [T, B, H], c_T [B, H] and, if save, the saved tensors (gq, gi, cq, tq, ci; see above).
// h0q int8 [B, H] / c0 float [B, H] (optional): the initial state's integers and cell value (zero if absent).
std::vector<at::Tensor> lstm_fwd(const at::Tensor& p_, const at::Tensor& q_, const at::Tensor& m_,
                                 const at::Tensor& sig_, const at::Tensor& tnh_, const at::Tensor& tnc_,
                                 std::vector<double> consts, bool reverse, bool save,
                                 const std::optional<at::Tensor>& h0q_, const std::optional<at::Tensor>& c0_) {
  TORCH_CHECK(p_.dim() == 3 && p_.scalar_type() == at::kFloat, "qat_lstm: p must be float32 [T, B, 4H]");
  TORCH_CHECK(q_.scalar_type() == at::kChar && m_.scalar_type() == at::kFloat, "qat_lstm: q int8, m float32");
  at::Tensor p = p_.contiguous(), q = q_.contiguous(), m = m_.contiguous();
  at::Tensor sigt = sig_.contiguous(), tnht = tnh_.contiguous(), tnct = tnc_.contiguous();
  const Consts K = make_consts(consts);
  const Table sig(sigt), tnh(tnht), tnc(tnct);
  TORCH_CHECK(sig.n <= 64 && tnh.n <= 64 && tnc.n <= 64, "qat_lstm: at most 64 PWL pieces");
  const int64_t T = p.size(0), B = p.size(1), H = q.size(1);
  TORCH_CHECK(p.size(2) == 4 * H && q.size(0) == 4 * H && m.numel() == 4 * H, "qat_lstm: shape mismatch");
  auto opt = p.options();
  at::Tensor y = at::empty({T, B, H}, opt);
  at::Tensor cbuf = at::zeros({3, B, H}, opt);  // c_0 (0 unless given), then ping-pong cell states
  const bool has_h0 = h0q_.has_value() && h0q_->defined();
  if (c0_.has_value() && c0_->defined()) {
    TORCH_CHECK(c0_->scalar_type() == at::kFloat && c0_->numel() == B * H, "qat_lstm: c0 must be float32 [B, H]");
    cbuf[0].copy_(c0_->reshape({B, H}));
  }
  at::Tensor gq, gi, cq, tq, ci;
  if (save) {
    auto o16 = opt.dtype(at::kShort);
    gq = at::empty({T, B, 4 * H}, o16);
    gi = at::empty({T, B, 4 * H}, o16);
    cq = at::empty({T, B, H}, o16);
    tq = at::empty({T, B, H}, o16);
    ci = at::empty({T, B, H}, o16);
  }
  at::Tensor acc = at::empty({B, 4 * H}, opt.dtype(at::kInt));
  at::Tensor hq = at::zeros({B, H}, opt.dtype(at::kChar));
  if (has_h0) {
    TORCH_CHECK(h0q_->scalar_type() == at::kChar && h0q_->numel() == B * H, "qat_lstm: h0q must be int8 [B, H]");
    hq.copy_(h0q_->reshape({B, H}));
  }
  const float* pp = p.data_ptr<float>();
  const float* pm = m.data_ptr<float>();
  float* pcb = cbuf.data_ptr<float>();
  const float* pcprev = pcb;
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    if (s > 0 || has_h0) int_product(acc, hq, q);  // from the zero state the first product is 0
    const int32_t* pa = (s > 0 || has_h0) ? acc.data_ptr<int32_t>() : nullptr;
    const int64_t o4 = t * B * 4 * H, o1 = t * B * H;
    float* pc = pcb + (1 + s % 2) * B * H;  // c_t
    float* py = y.data_ptr<float>() + o1;
    int8_t* phq = hq.data_ptr<int8_t>();
    const float* pcp = pcprev;
    at::parallel_for(0, B, grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r4 = b * 4 * H, r1 = b * H;
        RowOut o;
        o.h = py + r1;
        o.hq = phq + r1;
        o.c = pc + r1;
        o.gq = save ? gq.data_ptr<int16_t>() + o4 + r4 : nullptr;
        o.gi = save ? gi.data_ptr<int16_t>() + o4 + r4 : nullptr;
        o.cq = save ? cq.data_ptr<int16_t>() + o1 + r1 : nullptr;
        o.tq = save ? tq.data_ptr<int16_t>() + o1 + r1 : nullptr;
        o.ci = save ? ci.data_ptr<int16_t>() + o1 + r1 : nullptr;
        step_row(K, sig, tnh, tnc, H, pp + o4 + r4, pa ? pa + r4 : nullptr, pm, pcp + r1, o, save);
      }
    });
    pcprev = pc;
  }
  at::Tensor c_last = at::empty({B, H}, opt);
  std::copy(pcprev, pcprev + B * H, c_last.data_ptr<float>());
  if (!save) return {y, c_last};
  return {y, c_last, gq, gi, cq, tq, ci};
}

// Backward of one direction: dy [T, B, H] (grad of y), dc [B, H] (grad of c_T), wh the fake-quantized
// recurrent weight, y and the saved tensors of lstm_fwd, its tables and constants.
// h0 / c0 (optional, float [B, H]): the initial state the forward started from.
// Returns dp [T, B, 4H] (grad of the input part before its fake quant), dwh [4H, H], and the grads
// dh0, dc0 [B, H] of the initial state (meaningful only when h0 / c0 were given).
std::vector<at::Tensor> lstm_bwd(const at::Tensor& dy_, const std::optional<at::Tensor>& dc_, const at::Tensor& wh_,
                                 const at::Tensor& y, const at::Tensor& gq, const at::Tensor& gi,
                                 const at::Tensor& cq, const at::Tensor& tq, const at::Tensor& ci,
                                 const at::Tensor& sig_, const at::Tensor& tnh_, const at::Tensor& tnc_,
                                 std::vector<double> consts, bool reverse,
                                 const std::optional<at::Tensor>& h0_, const std::optional<at::Tensor>& c0_) {
  at::Tensor dy = dy_.contiguous(), wh = wh_.contiguous();
  at::Tensor wht = wh.t().contiguous();  // [H, 4H]: dh = da @ wh = da @ wht^T
  at::Tensor sigt = sig_.contiguous(), tnht = tnh_.contiguous(), tnct = tnc_.contiguous();
  const Consts K = make_consts(consts);
  const Table sig(sigt), tnh(tnht), tnc(tnct);
  const int64_t T = y.size(0), B = y.size(1), H = y.size(2);
  auto opt = y.options();
  at::Tensor dp = at::empty({T, B, 4 * H}, opt);
  at::Tensor da = at::empty({T, B, 4 * H}, opt);
  at::Tensor dhr = at::zeros({B, H}, opt);  // recurrent part of dh_t
  at::Tensor dcc = (dc_.has_value() && dc_->defined()) ? dc_->contiguous().clone() : at::zeros({B, H}, opt);
  const float* pdy = dy.data_ptr<float>();
  const int16_t* pgq = gq.data_ptr<int16_t>();
  const int16_t* pgi = gi.data_ptr<int16_t>();
  const int16_t* pcq = cq.data_ptr<int16_t>();
  const int16_t* ptq = tq.data_ptr<int16_t>();
  const int16_t* pci = ci.data_ptr<int16_t>();
  float* pdc = dcc.data_ptr<float>();
  const bool has_h0 = h0_.has_value() && h0_->defined();
  at::Tensor c0 = (c0_.has_value() && c0_->defined()) ? c0_->contiguous() : at::Tensor();
  const float* pc0 = c0.defined() ? c0.data_ptr<float>() : nullptr;  // c_{-1} of the first step
  const float* slope[4] = {sig.a, sig.a, tnh.a, sig.a};
  for (int64_t s = T - 1; s >= 0; --s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t tp = reverse ? t + 1 : t - 1;  // the step before t in processing order (s > 0)
    const int64_t o4 = t * B * 4 * H, o1 = t * B * H;
    if (!dhr.is_contiguous()) dhr = dhr.contiguous();
    const float* pdh = dhr.data_ptr<float>();
    float* pz = dp.data_ptr<float>() + o4;
    float* pa = da.data_ptr<float>() + o4;
    at::parallel_for(0, B, grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r4 = b * 4 * H, r1 = b * H;
        const int16_t* g = pgq + o4 + r4;
        const int16_t* gf = pgi + o4 + r4;
        const int16_t* cqr = pcq + o1 + r1;
        const int16_t* tqr = ptq + o1 + r1;
        const int16_t* cir = pci + o1 + r1;
        const int16_t* cp = s > 0 ? pcq + tp * B * H + r1 : nullptr;  // c_{t-1}
        const float* dyr = pdy + o1 + r1;
        const float* dhr_ = pdh + r1;
        float* dcr = pdc + r1;
        float* z = pz + r4;
        float* ar = pa + r4;
        for (int64_t j = 0; j < H; ++j) {
          const int cinfo = cir[j];
          const float gi_ = g[j] * kQ15, gf_ = g[H + j] * kQ15, gg_ = g[2 * H + j] * kQ15,
                      go_ = g[3 * H + j] * kQ15;
          const float tc = tqr[j] * kQ15;
          float dh = dyr[j] + dhr_[j];
          float P = dh * decode(cinfo & 3);         // through the h fake quant
          float d_o = P * tc;                       // d(o * tc) / do = tc
          float d_tc = P * go_;                     // ... / dtc = o
          float dtcf = tnc.a[(cinfo >> 8) & 127] * decode4((cinfo >> 4) & 3);
          float dct = dcr[j] + d_tc * dtcf;         // grad of c_t (next step's f * c and tanh(c))
          float dpre = (cinfo & 4) ? dct : 0.0f * dct;  // through the cell saturation
          float cprev = cp ? cp[j] * K.cs : (pc0 ? pc0[r1 + j] : 0.0f);
          float d_f = dpre * cprev;
          float d_i = dpre * gg_;
          float d_g = dpre * gi_;
          dcr[j] = dpre * gf_;                      // grad of c_{t-1}
          const float dgate[4] = {d_i, d_f, d_g, d_o};
          for (int k = 0; k < 4; ++k) {
            const int info = gf[k * H + j];
            const float dz = dgate[k] * (slope[k][(info >> 8) & 127] * decode4((info >> 4) & 3));
            z[k * H + j] = dz * decode((info >> 2) & 3);
            ar[k * H + j] = dz * decode(info & 3);
          }
        }
      }
    });
    if (s > 0 || has_h0) dhr = linear_nt(da[t], wht);  // at s = 0: the grad of h0
  }
  at::Tensor dwh;
  if (T > 1) {
    // dwh = sum_t da_t^T h_{t-1}: one product over all steps
    at::Tensor dan = reverse ? da.narrow(0, 0, T - 1) : da.narrow(0, 1, T - 1);
    at::Tensor hp = reverse ? y.narrow(0, 1, T - 1) : y.narrow(0, 0, T - 1);
    dwh = linear_nt(dan.reshape({(T - 1) * B, 4 * H}).t(), hp.reshape({(T - 1) * B, H}).t());
  } else {
    dwh = at::zeros({4 * H, H}, opt);
  }
  if (has_h0) {  // the first step's product with h0
    const int64_t t0 = reverse ? T - 1 : 0;
    dwh = dwh + linear_nt(da[t0].t(), h0_->contiguous().reshape({B, H}).t());
  }
  return {dp, dwh, dhr, dcc};  // dhr / dcc: the grads of h0 / c0 (meaningful only when given)
}

}  // namespace

TORCH_LIBRARY(intlstm_qat, m) {
  m.def("lstm_fwd(Tensor p, Tensor q, Tensor m, Tensor sig, Tensor tanh, Tensor tanh_c, float[] consts, "
        "bool reverse, bool save, Tensor? h0q=None, Tensor? c0=None) -> Tensor[]", &lstm_fwd);
  m.def("lstm_bwd(Tensor dy, Tensor? dc, Tensor wh, Tensor y, Tensor gq, Tensor gi, Tensor cq, Tensor tq, "
        "Tensor ci, Tensor sig, Tensor tanh, Tensor tanh_c, float[] consts, bool reverse, Tensor? h0=None, "
        "Tensor? c0=None) -> Tensor[]", &lstm_bwd);
}
