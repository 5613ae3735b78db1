// GroupNorm, optionally followed by SiLU, for channels-last (NHWC) CPU tensors.
//
// PyTorch's CPU GroupNorm is fast on NCHW tensors and slow on channels-last ones (bf16
// (64, 64, 28, 28): ~20 ms forward vs ~1 ms), while oneDNN's convolutions are fastest on
// channels-last ones. This kernel lets a U-Net stay channels-last: it works on the (N, H*W, C)
// buffer directly, in two passes over each sample (statistics, then output), float32
// arithmetic for float32 and bf16 storage. Fusing the SiLU that follows every GroupNorm in a
// ResNet block saves one more pass each way.
//
// Per sample n and group g of m = H*W*C/G elements:
//   mu = sum(x)/m,  var = sum(x^2)/m - mu^2,  r = 1/sqrt(var + eps),  xhat = (x - mu) r
//   z = w_c xhat + b_c,   y = z (GroupNorm) or z * sigmoid(z) (with SiLU)
// Backward, with dz = dy (or dy * silu'(z)):
//   dx = r (w_c dz - mean_g(w dz) - xhat mean_g(w dz xhat)),  dw = sum dz xhat,  db = sum dz
// Samples are processed in parallel; dw and db are summed over samples afterwards in a fixed
// order, so results do not depend on the thread count.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// bf16 is handled as its raw 16 bits: the conversions below are plain integer operations that
// GCC vectorises (through at::BFloat16's operators it did not).
inline float to_f(float v) { return v; }
inline float to_f(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
template <typename T> T from_f(float v);
template <> inline float from_f<float>(float v) { return v; }
template <> inline uint16_t from_f<uint16_t>(float v) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <typename T>
void forward_impl(const T* X, T* Y, const float* W, const float* B, float* M, float* R,
                  int64_t N, int64_t C, int64_t HW, int64_t G, double eps, bool silu) {
  const int64_t Cg = C / G;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> s1(C), s2(C), a(C), b(C);
    for (int64_t n = n0; n < n1; ++n) {
      const T* xn = X + n * HW * C;
      std::fill(s1.begin(), s1.end(), 0.f);
      std::fill(s2.begin(), s2.end(), 0.f);
      float* p1 = s1.data();
      float* p2 = s2.data();
      for (int64_t p = 0; p < HW; ++p) {
        const T* row = xn + p * C;
        for (int64_t c = 0; c < C; ++c) {
          const float v = to_f(row[c]);
          p1[c] += v;
          p2[c] += v * v;
        }
      }
      const double m = static_cast<double>(HW * Cg);
      for (int64_t g = 0; g < G; ++g) {
        double t1 = 0, t2 = 0;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          t1 += s1[c];
          t2 += s2[c];
        }
        const double mu = t1 / m;
        const double r = 1.0 / std::sqrt(std::max(t2 / m - mu * mu, 0.0) + eps);
        M[n * G + g] = static_cast<float>(mu);
        R[n * G + g] = static_cast<float>(r);
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          a[c] = static_cast<float>(r) * W[c];
          b[c] = B[c] - static_cast<float>(mu) * a[c];
        }
      }
      const float* pa = a.data();
      const float* pb = b.data();
      T* yn = Y + n * HW * C;
      for (int64_t p = 0; p < HW; ++p) {
        const T* row = xn + p * C;
        T* out = yn + p * C;
        if (silu) {
          for (int64_t c = 0; c < C; ++c) {
            const float z = to_f(row[c]) * pa[c] + pb[c];
            out[c] = from_f<T>(z / (1.f + std::exp(-z)));
          }
        } else {
          for (int64_t c = 0; c < C; ++c) out[c] = from_f<T>(to_f(row[c]) * pa[c] + pb[c]);
        }
      }
    }
  });
}

// Pass 1 over one sample: dz (kept in a float buffer) and its per-channel sums Σdz, Σdz·x̂.
template <typename T>
void backward_pass1(const T* x, const T* dy, float* dz, float* sdz, float* sdzx,
                    const float* mu, const float* r, const float* w, const float* b,
                    int64_t HW, int64_t C, bool silu) {
  for (int64_t p = 0; p < HW; ++p) {
    const T* xr = x + p * C;
    const T* dr = dy + p * C;
    float* dzr = dz + p * C;
    if (silu) {
#pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) {
        const float xh = (to_f(xr[c]) - mu[c]) * r[c];
        const float z = xh * w[c] + b[c];
        const float sg = 1.f / (1.f + std::exp(-z));  // d/dz [z σ(z)] = σ (1 + z (1 − σ))
        const float d = to_f(dr[c]) * sg * (1.f + z * (1.f - sg));
        dzr[c] = d;
        sdz[c] += d;
        sdzx[c] += d * xh;
      }
    } else {
#pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) {
        const float xh = (to_f(xr[c]) - mu[c]) * r[c];
        const float d = to_f(dr[c]);
        dzr[c] = d;
        sdz[c] += d;
        sdzx[c] += d * xh;
      }
    }
  }
}

// Pass 2 over one sample: dx = ka·dz + kb·x + kc per channel.
template <typename T>
void backward_pass2(const T* x, const float* dz, T* dx, const float* ka, const float* kb,
                    const float* kc, int64_t HW, int64_t C) {
  for (int64_t p = 0; p < HW; ++p) {
    const T* xr = x + p * C;
    const float* dzr = dz + p * C;
    T* o = dx + p * C;
    for (int64_t c = 0; c < C; ++c) o[c] = from_f<T>(ka[c] * dzr[c] + kb[c] * to_f(xr[c]) + kc[c]);
  }
}

template <typename T>
void backward_impl(const T* DY, const T* X, T* DX, const float* W, const float* B,
                   const float* M, const float* R, float* DWn, float* DBn, int64_t N, int64_t C,
                   int64_t HW, int64_t G, bool silu) {
  const int64_t Cg = C / G;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> mu(C), r(C), sdz(C), sdzx(C), ka(C), kb(C), kc(C), dz(HW * C);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        mu[c] = M[n * G + c / Cg];
        r[c] = R[n * G + c / Cg];
      }
      std::fill(sdz.begin(), sdz.end(), 0.f);
      std::fill(sdzx.begin(), sdzx.end(), 0.f);
      const int64_t off = n * HW * C;
      backward_pass1<T>(X + off, DY + off, dz.data(), sdz.data(), sdzx.data(), mu.data(),
                        r.data(), W, B, HW, C, silu);
      const float m = static_cast<float>(HW * Cg);
      for (int64_t g = 0; g < G; ++g) {
        float gm = 0.f, gxm = 0.f;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          gm += W[c] * sdz[c];
          gxm += W[c] * sdzx[c];
        }
        gm /= m;
        gxm /= m;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          ka[c] = r[c] * W[c];
          kb[c] = -r[c] * r[c] * gxm;
          kc[c] = -r[c] * gm - kb[c] * mu[c];
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        DWn[n * C + c] = sdzx[c];
        DBn[n * C + c] = sdz[c];
      }
      backward_pass2<T>(X + off, dz.data(), DX + off, ka.data(), kb.data(), kc.data(), HW, C);
    }
  });
}

uint16_t* bits(const at::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

void check(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t G) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "x must be a 4-D CPU tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "x must be channels-last");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16");
  TORCH_CHECK(G > 0 && x.size(1) % G == 0, "channels must be divisible by groups");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat &&
                  weight.is_contiguous() && bias.is_contiguous() &&
                  weight.numel() == x.size(1) && bias.numel() == x.size(1),
              "weight and bias must be contiguous float32 vectors of length C");
}

std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bias, int64_t G, double eps, bool silu) {
  check(x, weight, bias, G);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto mean = at::empty({N, G}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({N, G}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kFloat) {
    forward_impl<float>(x.data_ptr<float>(), y.data_ptr<float>(), weight.data_ptr<float>(),
                        bias.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                        N, C, HW, G, eps, silu);
  } else {
    forward_impl<uint16_t>(bits(x), bits(y),
                               weight.data_ptr<float>(), bias.data_ptr<float>(),
                               mean.data_ptr<float>(), rstd.data_ptr<float>(), N, C, HW, G, eps,
                               silu);
  }
  return {y, mean, rstd};
}

std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x,
                                 const at::Tensor& mean, const at::Tensor& rstd,
                                 const at::Tensor& weight, const at::Tensor& bias, int64_t G,
                                 bool silu) {
  check(x, weight, bias, G);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto dy = grad.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  auto dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto dw_n = at::empty({N, C}, x.options().dtype(at::kFloat));
  auto db_n = at::empty({N, C}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kFloat) {
    backward_impl<float>(dy.data_ptr<float>(), x.data_ptr<float>(), dx.data_ptr<float>(),
                         weight.data_ptr<float>(), bias.data_ptr<float>(),
                         mean.data_ptr<float>(), rstd.data_ptr<float>(), dw_n.data_ptr<float>(),
                         db_n.data_ptr<float>(), N, C, HW, G, silu);
  } else {
    backward_impl<uint16_t>(bits(dy), bits(x), bits(dx), weight.data_ptr<float>(),
                                bias.data_ptr<float>(), mean.data_ptr<float>(),
                                rstd.data_ptr<float>(), dw_n.data_ptr<float>(),
                                db_n.data_ptr<float>(), N, C, HW, G, silu);
  }
  return {dx, dw_n.sum(0), db_n.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "GroupNorm(+SiLU) forward: (y, mean, rstd)");
  m.def("backward", &backward, "GroupNorm(+SiLU) backward: (dx, dweight, dbias)");
}
