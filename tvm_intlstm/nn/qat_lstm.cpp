// Fused QAT LSTM direction: the whole time loop of QuantLSTM.forward_fake (tvm_intlstm/nn/modules.py)
// in one forward and one backward call, built at first use by tvm_intlstm/nn/qat_fast.py.
//
// Forward values are the loop path's values bit for bit: the same float32 operations in the same
// order (fake quantization = clamp, x / s, round half to even, * s, xc + (q - xc); the PWL tables
// evaluated as v[idx] + a[idx] * (xc - k[idx]); the recurrent product through at::mm as in the loop
// path). Compile with -ffp-contract=off and without -ffast-math so that nothing is fused or reordered.
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

// FloatPWL over a chunk before its final clamp (act_q15): y and dy/dx. The piece search keeps its
// running selections in vector registers (GCC/Clang vector extensions; split into narrower vectors
// where the machine has no 64-byte ones), as a loop over pieces through memory would serialise.

static inline void pwl_chunk(const float* x, const Table& t, float* y, float* dy) {
  vf xv, dd;
  {
    float xc[L], d[L];
    for (int l = 0; l < L; ++l) xc[l] = clip_st(x[l], t.k[0], t.k[t.n], d[l]);
    std::memcpy(&xv, xc, sizeof(vf));
    std::memcpy(&dd, d, sizeof(vf));
  }
  vf zero = {};
  vf vv, aa, kk;
  if (kPermute && t.n <= L) {  // piece index = #{p >= 1 : k_p <= xc}, then a lane permute of the tables
    vi cnt = {};
    for (int64_t p = 1; p < t.n; ++p) cnt -= (xv >= t.k[p]);
    vv = __builtin_shuffle(t.vv, cnt);
    aa = __builtin_shuffle(t.va, cnt);
    kk = __builtin_shuffle(t.vk, cnt);
  } else {
    vv = zero + t.v[0], aa = zero + t.a[0], kk = zero + t.k[0];
    for (int64_t p = 1; p < t.n; ++p) {  // the last piece whose knot is <= xc (searchsorted, right)
      const float kp = t.k[p];
      vi s = xv >= kp;
      vv = s ? zero + t.v[p] : vv;
      aa = s ? zero + t.a[p] : aa;
      kk = s ? zero + kp : kk;
    }
  }
  float v[L], a[L];
  vf vr = vv + aa * (xv - kk);
  std::memcpy(v, &vr, sizeof(vf));
  std::memcpy(a, &aa, sizeof(vf));
  float d[L];
  std::memcpy(d, &dd, sizeof(vf));
  for (int l = 0; l < L; ++l) {
    y[l] = v[l];
    dy[l] = a[l] * d[l];
  }
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

// straight-through factors 0, 1/2, 1 as 2-bit codes
static inline uint8_t code(float d) { return d == 1.0f ? 2 : (d == 0.5f ? 1 : 0); }
static inline float decode(int c) { return 0.5f * (float)c; }

struct RowOut {  // per batch row of one step
  float* h;          // [H] hidden output (float, on the s_h grid)
  int8_t* hq;        // [H] its integer value (next step's recurrent product)
  float* c;          // [H] cell state out
  float* gates;      // [4H] quantized i, f, g, o (save)
  float* dgate;      // [4H] d gate / d (gx + gh) (save)
  uint8_t* masks;    // [4H] straight-through codes: recurrent product (bits 0-1), input part (bits 2-3) (save)
  float* sc;         // [4H] blocks: c, mc, tc, mh (save)
  float* dtc;        // [H] d tanh_c(c) / dc (save)
};

// one step of one batch row: p = input part (before fake quant), acc = integer recurrent product, m = its
// per-gate-row scale s_h * s_w, cprev = c_{t-1}. Works on chunks of L units; loads and stores take the
// tail's length, the arithmetic always runs on L lanes (so it compiles to straight vector code).
static void step_row(const Consts& K, const Table& sig, const Table& tnh, const Table& tnc, int64_t H,
                     const float* p, const int32_t* acc, const float* m, const float* cprev, const RowOut& o,
                     bool save) {
  const float inv_gs = 1.0f / K.gs, inv_cs = 1.0f / K.cs, inv_q15 = 32768.0f;
  for (int64_t j0 = 0; j0 < H; j0 += L) {
    const int len = (int)std::min<int64_t>(L, H - j0);
    float z[4][L], mz[4][L], act[4][L], dact[4][L];
    uint8_t mk[4][L];
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
        mk[gi][l] = (uint8_t)(code(dm) | (code(dx) << 2));
        mz[gi][l] = (zs >= K.z_lo && zs <= K.z_hi) ? 1.0f : 0.0f;
        float zc = zs < K.z_lo ? K.z_lo : zs;
        z[gi][l] = zc > K.z_hi ? K.z_hi : zc;
      }
      pwl_chunk(z[gi], gi == 2 ? tnh : sig, act[gi], dact[gi]);
      for (int l = 0; l < L; ++l) {
        float dq;
        act[gi][l] = act_q15(act[gi][l], dq);
        dact[gi][l] = dact[gi][l] * dq * mz[gi][l];
      }
    }
    float cp[L], c[L], mc[L], tc[L], dt[L], mh[L], hv[L];
    int8_t kv[L];
    if (len == L) {
      for (int l = 0; l < L; ++l) cp[l] = cprev[j0 + l];
    } else {
      for (int l = 0; l < L; ++l) cp[l] = l < len ? cprev[j0 + l] : 0.0f;
    }
    for (int l = 0; l < L; ++l) {
      float d0;
      float fc = fq_open(act[1][l] * cp[l], K.cs, inv_cs);
      float ig = fq_open(act[0][l] * act[2][l], K.cs, inv_cs);
      float s = fc + ig;
      mc[l] = (s >= K.c_lo && s <= K.c_hi) ? 1.0f : 0.0f;
      float sc0 = s < K.c_lo ? K.c_lo : s;
      c[l] = sc0 > K.c_hi ? K.c_hi : sc0;
    }
    pwl_chunk(c, tnc, tc, dt);
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
      o.h[j0 + l] = hv[l];
      o.hq[j0 + l] = kv[l];
      o.c[j0 + l] = c[l];
    }
    if (save) {
      for (int gi = 0; gi < 4; ++gi) {
        const int64_t off = gi * H + j0;
        for (int l = 0; l < len; ++l) {
          o.gates[off + l] = act[gi][l];
          o.dgate[off + l] = dact[gi][l];
          o.masks[off + l] = mk[gi][l];
        }
      }
      for (int l = 0; l < len; ++l) {
        o.sc[H + j0 + l] = mc[l];
        o.sc[2 * H + j0 + l] = tc[l];
        o.sc[3 * H + j0 + l] = mh[l];
        o.dtc[j0 + l] = dt[l];
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

// exact integer recurrent product hq [B, H] x q^T (q int8 [4H, H]) into acc int32 [B, 4H]
static void int_product(at::Tensor& acc, const at::Tensor& hq, const at::Tensor& q) {
  if (q.size(1) >= 8) {  // oneDNN's s8 GEMM (at::_int_mm is wrong for an inner dimension of 1)
    at::_int_mm_out(acc, hq, q.t());
  } else {
    acc.copy_(at::mm(hq.to(at::kDouble), q.to(at::kDouble).t()));
  }
}

// Forward of one direction. p [T, B, 4H]: input part x W_x^T + b before its fake quantization;
// wh [4H, H] fake-quantized recurrent weight = q * s_w (q int8); m [4H] = s_h * s_w (float32).
// Returns y [T, B, H], c_T [B, H] and, if save, what backward needs.
std::vector<at::Tensor> lstm_fwd(const at::Tensor& p_, const at::Tensor& q_, const at::Tensor& m_,
                                 const at::Tensor& sig_, const at::Tensor& tnh_, const at::Tensor& tnc_,
                                 std::vector<double> consts, bool reverse, bool save) {
  TORCH_CHECK(p_.dim() == 3 && p_.scalar_type() == at::kFloat, "qat_lstm: p must be float32 [T, B, 4H]");
  TORCH_CHECK(q_.scalar_type() == at::kChar && m_.scalar_type() == at::kFloat, "qat_lstm: q int8, m float32");
  at::Tensor p = p_.contiguous(), q = q_.contiguous(), m = m_.contiguous();
  at::Tensor sigt = sig_.contiguous(), tnht = tnh_.contiguous(), tnct = tnc_.contiguous();
  const Consts K = make_consts(consts);
  const Table sig(sigt), tnh(tnht), tnc(tnct);
  const int64_t T = p.size(0), B = p.size(1), H = q.size(1);
  TORCH_CHECK(p.size(2) == 4 * H && q.size(0) == 4 * H && m.numel() == 4 * H, "qat_lstm: shape mismatch");
  auto opt = p.options();
  at::Tensor y = at::empty({T, B, H}, opt);
  at::Tensor cbuf = at::empty({save ? 0 : 2, B, H}, opt);  // ping-pong cell state when not saving
  at::Tensor gates, dgate, masks, sc, dtc;
  if (save) {
    gates = at::empty({T, B, 4 * H}, opt);
    dgate = at::empty({T, B, 4 * H}, opt);
    masks = at::empty({T, B, 4 * H}, opt.dtype(at::kByte));
    sc = at::empty({T, B, 4 * H}, opt);
    dtc = at::empty({T, B, H}, opt);
  }
  at::Tensor acc = at::empty({B, 4 * H}, opt.dtype(at::kInt));
  at::Tensor hq = at::zeros({B, H}, opt.dtype(at::kChar));
  at::Tensor c0 = at::zeros({B, H}, opt);
  const float* pp = p.data_ptr<float>();
  const float* pm = m.data_ptr<float>();
  const float* pcprev = c0.data_ptr<float>();
  float* pclast = nullptr;
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    if (s > 0) int_product(acc, hq, q);
    const int32_t* pa = s > 0 ? acc.data_ptr<int32_t>() : nullptr;
    const int64_t o4 = t * B * 4 * H, o1 = t * B * H;
    float* pc = save ? sc.data_ptr<float>() + o4 : cbuf.data_ptr<float>() + (s % 2) * B * H;  // c_t
    float* py = y.data_ptr<float>() + o1;
    int8_t* phq = hq.data_ptr<int8_t>();
    const float* pcp = pcprev;
    const int64_t cstride = save ? 4 * H : H;  // row stride of the cell-state rows
    at::parallel_for(0, B, grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r4 = b * 4 * H, r1 = b * H;
        RowOut o;
        o.h = py + r1;
        o.hq = phq + r1;
        o.c = pc + b * cstride;
        if (save) {
          o.gates = gates.data_ptr<float>() + o4 + r4;
          o.dgate = dgate.data_ptr<float>() + o4 + r4;
          o.masks = masks.data_ptr<uint8_t>() + o4 + r4;
          o.sc = pc + r4;
          o.dtc = dtc.data_ptr<float>() + o1 + r1;
        }
        step_row(K, sig, tnh, tnc, H, pp + o4 + r4, pa ? pa + r4 : nullptr, pm,
                 pcp + (s > 0 ? b * cstride : r1), o, save);
      }
    });
    pcprev = pc;
    pclast = pc;
  }
  at::Tensor c_last = at::empty({B, H}, opt);
  if (T > 0) {
    const int64_t cstride = save ? 4 * H : H;
    for (int64_t b = 0; b < B; ++b)
      std::copy(pclast + b * cstride, pclast + b * cstride + H, c_last.data_ptr<float>() + b * H);
  } else {
    c_last.zero_();
  }
  if (!save) return {y, c_last};
  return {y, c_last, gates, dgate, masks, sc, dtc};
}

// Backward of one direction: dy [T, B, H] (grad of y), dc [B, H] (grad of c_T), wh the fake-quantized
// recurrent weight. Returns dp [T, B, 4H] (grad of the input part before its fake quant), dwh [4H, H].
std::vector<at::Tensor> lstm_bwd(const at::Tensor& dy_, const std::optional<at::Tensor>& dc_, const at::Tensor& wh_,
                                 const at::Tensor& y, const at::Tensor& gates, const at::Tensor& dgate,
                                 const at::Tensor& masks, const at::Tensor& sc, const at::Tensor& dtc,
                                 bool reverse) {
  at::Tensor dy = dy_.contiguous(), wh = wh_.contiguous();
  at::Tensor wht = wh.t().contiguous();  // [H, 4H]: dh = da @ wh = da @ wht^T
  const int64_t T = y.size(0), B = y.size(1), H = y.size(2);
  auto opt = y.options();
  at::Tensor dp = at::empty({T, B, 4 * H}, opt);
  at::Tensor da = at::empty({T, B, 4 * H}, opt);
  at::Tensor dhr = at::zeros({B, H}, opt);  // recurrent part of dh_t
  at::Tensor dcc = (dc_.has_value() && dc_->defined()) ? dc_->contiguous().clone() : at::zeros({B, H}, opt);
  const float* pdy = dy.data_ptr<float>();
  const float* pg0 = gates.data_ptr<float>();
  const float* pd0 = dgate.data_ptr<float>();
  const uint8_t* pm0 = masks.data_ptr<uint8_t>();
  const float* ps0 = sc.data_ptr<float>();
  const float* pt0 = dtc.data_ptr<float>();
  float* pdc = dcc.data_ptr<float>();
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
        const float* g = pg0 + o4 + r4;
        const float* dg = pd0 + o4 + r4;
        const uint8_t* mk = pm0 + o4 + r4;
        const float* S = ps0 + o4 + r4;  // c, mc, tc, mh
        const float* dt = pt0 + o1 + r1;
        const float* cp = s > 0 ? ps0 + tp * B * 4 * H + r4 : nullptr;  // c_{t-1}
        const float* dyr = pdy + o1 + r1;
        const float* dhr_ = pdh + r1;
        float* dcr = pdc + r1;
        float* z = pz + r4;
        float* ar = pa + r4;
        for (int64_t j = 0; j < H; ++j) {
          float dh = dyr[j] + dhr_[j];
          float P = dh * S[3 * H + j];              // through the h fake quant
          float d_o = P * S[2 * H + j];             // d(o * tc) / do = tc
          float d_tc = P * g[3 * H + j];            // ... / dtc = o
          float dct = dcr[j] + d_tc * dt[j];        // grad of c_t (next step's f * c and tanh(c))
          float dpre = dct * S[H + j];              // through the cell saturation
          float cprev = cp ? cp[j] : 0.0f;
          float d_f = dpre * cprev;
          float d_i = dpre * g[2 * H + j];
          float d_g = dpre * g[j];
          dcr[j] = dpre * g[H + j];                 // grad of c_{t-1}
          float dz[4] = {d_i * dg[j], d_f * dg[H + j], d_g * dg[2 * H + j], d_o * dg[3 * H + j]};
          for (int gi = 0; gi < 4; ++gi) {
            const int c = mk[gi * H + j];
            z[gi * H + j] = dz[gi] * decode(c >> 2);
            ar[gi * H + j] = dz[gi] * decode(c & 3);
          }
        }
      }
    });
    if (s > 0) dhr = linear_nt(da[t], wht);
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
  return {dp, dwh};
}

}  // namespace

TORCH_LIBRARY(intlstm_qat, m) {
  m.def("lstm_fwd(Tensor p, Tensor q, Tensor m, Tensor sig, Tensor tanh, Tensor tanh_c, float[] consts, "
        "bool reverse, bool save) -> Tensor[]", &lstm_fwd);
  m.def("lstm_bwd(Tensor dy, Tensor? dc, Tensor wh, Tensor y, Tensor gates, Tensor dgate, Tensor masks, "
        "Tensor sc, Tensor dtc, bool reverse) -> Tensor[]", &lstm_bwd);
}
