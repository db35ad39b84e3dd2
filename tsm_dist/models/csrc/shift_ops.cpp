// The temporal shift's CPU training path without Python: ops registered with torch.library (namespace tsm_dist),
// built by tsm_dist/models/shift_native.py (install.sh runs it) and loaded with torch.ops.load_library. Python
// falls back to shift_kernels.py's kernels when this is not built.
//
//   tsm_dist::shift_copy(x, num_frames, fold, offsets) -> shift(x), a new tensor in x's layout
//   tsm_dist::shift_add_(x, direct?, num_frames, fold, offsets) -> x = shift(x) + direct in place (the
//                            backward's move-back, with the identity path's gradient)
//   tsm_dist::shifted_conv2d(x, weight, bias?, stride, padding, dilation, groups, num_frames, fold,
//                            offsets, in_place=True) -> (conv2d(shift(x)), x), differentiable; in_place: x is
//                            shifted in place around the conv and, by hooks on the conv's own autograd node, around
//                            its weight gradient, and restored (no copy, no extra memory, no autograd Function);
//                            otherwise the conv reads a shifted copy (a C++ autograd Function)
//
// Group g is channels [g*fold, (g+1)*fold): frame t of it takes frame t + offsets[g] of its clip, zero
// where that is outside the clip (the shift of temporal_shift.py, bit for bit). Tensors are
// (N*T, C, H, W), dense in NCHW or channels-last order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/node.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::IntArrayRef;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kMaxGroups = 2;
constexpr int64_t kGrainElements = 1 << 15;  // a thread's smallest share of a pass

// A dense (N*T, C, H, W) tensor as frames of C channels by P pixels.
struct Geometry {
  int64_t frames, channels, pixels, num_frames, fold, groups;
  int64_t offsets[kMaxGroups];
  bool channels_last;

  int64_t frame_size() const { return channels * pixels; }
  int64_t moved() const { return groups * fold; }
  // Where group g's data for frame n (t = n % T) comes from; -1: outside the clip (zero).
  int64_t source(int64_t n, int64_t g) const {
    const int64_t t = n % num_frames + offsets[g];
    return t < 0 || t >= num_frames ? -1 : n + offsets[g];
  }
};

Geometry geometry(const Tensor& x, int64_t num_frames, int64_t fold, IntArrayRef offsets) {
  TORCH_CHECK(x.dim() == 4, "tsm_dist shift: expected (N*T, C, H, W), got ", x.dim(), " dims");
  TORCH_CHECK(x.device().is_cpu(), "tsm_dist shift: CPU tensors only");
  TORCH_CHECK(num_frames >= 1 && x.size(0) % num_frames == 0, "tsm_dist shift: batch dim ", x.size(0),
              " is not a multiple of num_frames=", num_frames);
  const int64_t groups = static_cast<int64_t>(offsets.size());
  TORCH_CHECK(groups >= 1 && groups <= kMaxGroups && fold >= 1 && groups * fold <= x.size(1),
              "tsm_dist shift: ", groups, " groups of ", fold, " channels do not fit ", x.size(1), " channels");
  const bool contiguous = x.is_contiguous();
  TORCH_CHECK(contiguous || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "tsm_dist shift: x must be dense NCHW or channels-last");
  Geometry g{x.size(0), x.size(1), x.size(2) * x.size(3), num_frames, fold, groups, {0, 0}, !contiguous};
  for (int64_t i = 0; i < groups; ++i) g.offsets[i] = offsets[i];  // any offset: outside the clip is zero
  return g;
}

int64_t grain(const Geometry& g, int64_t items_per_unit) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, items_per_unit));
}

// count runs of len values from src (runs src_stride apart) to dst (runs dst_stride apart); the usual lengths
// get a fixed-size copy.
template <typename T, int64_t Len>
void copy_fixed_runs(const T* src, int64_t src_stride, T* dst, int64_t dst_stride, int64_t count) {
  for (int64_t r = 0; r < count; ++r) std::copy_n(src + r * src_stride, Len, dst + r * dst_stride);
}

template <typename T>
void copy_runs(const T* src, int64_t src_stride, T* dst, int64_t dst_stride, int64_t len, int64_t count) {
  if (count == 1 || (src_stride == len && dst_stride == len)) {
    std::memcpy(dst, src, sizeof(T) * len * count);
    return;
  }
  switch (len) {
    case 1: return copy_fixed_runs<T, 1>(src, src_stride, dst, dst_stride, count);
    case 2: return copy_fixed_runs<T, 2>(src, src_stride, dst, dst_stride, count);
    case 4: return copy_fixed_runs<T, 4>(src, src_stride, dst, dst_stride, count);
    case 8: return copy_fixed_runs<T, 8>(src, src_stride, dst, dst_stride, count);
    case 16: return copy_fixed_runs<T, 16>(src, src_stride, dst, dst_stride, count);
    case 32: return copy_fixed_runs<T, 32>(src, src_stride, dst, dst_stride, count);
    default:
      for (int64_t r = 0; r < count; ++r) std::copy_n(src + r * src_stride, len, dst + r * dst_stride);
  }
}

template <typename T>
void zero_runs(T* dst, int64_t stride, int64_t len, int64_t count) {
  for (int64_t r = 0; r < count; ++r) std::fill_n(dst + r * stride, len, T(0));
}

// Frame n of out = frame n of shift(x).
template <typename T>
void shift_frame(const T* x, T* out, const Geometry& g, int64_t n) {
  const int64_t frame = g.frame_size(), p = g.pixels, c = g.channels, fold = g.fold, moved = g.moved();
  const T* src[kMaxGroups];
  for (int64_t i = 0; i < g.groups; ++i) {
    const int64_t s = g.source(n, i);
    src[i] = s < 0 ? nullptr : x + s * frame;
  }
  const T* here = x + n * frame;
  T* o = out + n * frame;
  if (!g.channels_last) {  // a group's channels are one run of fold * P values per frame
    for (int64_t i = 0; i < g.groups; ++i) {
      if (src[i]) {
        std::memcpy(o + i * fold * p, src[i] + i * fold * p, sizeof(T) * fold * p);
      } else {
        std::memset(o + i * fold * p, 0, sizeof(T) * fold * p);
      }
    }
    std::memcpy(o + moved * p, here + moved * p, sizeof(T) * (c - moved) * p);
    return;
  }
  // A pixel's channels are together, a group is fold values per pixel: copy the whole frame at memory
  // speed, then overwrite the moved values while the frame is still in L1.
  std::memcpy(o, here, sizeof(T) * frame);
  for (int64_t i = 0; i < g.groups; ++i) {
    T* op = o + i * fold;
    if (!src[i]) {
      for (int64_t px = 0; px < p; ++px) std::fill_n(op + px * c, fold, T(0));
      continue;
    }
    copy_runs(src[i] + i * fold, c, op, c, fold, p);
  }
  (void)moved;
}

// count runs of ``len`` values, ``stride`` apart: dst = src + direct, either of which may be absent (zero).
template <typename T>
void add_runs(T* dst, const T* src, const T* direct, int64_t len, int64_t stride, int64_t count) {
  for (int64_t r = 0; r < count; ++r) {
    T* d = dst + r * stride;
    const T* s = src ? src + r * stride : nullptr;
    const T* a = direct ? direct + r * stride : nullptr;
    if (s && a) {
      for (int64_t k = 0; k < len; ++k) d[k] = s[k] + a[k];
    } else if (s) {
      std::copy_n(s, len, d);
    } else if (a) {
      std::copy_n(a, len, d);
    } else {
      std::fill_n(d, len, T(0));
    }
  }
}

// x = shift(x) + direct for one clip, in place in x (direct may be null): group i of frame n takes that group
// of frame source(n, i), visiting frames in the order that reads every source before it is overwritten
// (ascending for offset > 0, descending otherwise); the channels that stay only add direct.
template <typename T>
void shift_add_clip(T* x, const T* direct, const Geometry& g, int64_t clip) {
  const int64_t frame = g.frame_size(), p = g.pixels, c = g.channels, fold = g.fold, t_len = g.num_frames;
  const int64_t moved = g.moved();
  // a group's values in a frame: one run of fold * P (NCHW) or P runs of fold, C apart (channels-last)
  const int64_t len = g.channels_last ? fold : fold * p, stride = g.channels_last ? c : 0;
  const int64_t count = g.channels_last ? p : 1, step_in = g.channels_last ? 1 : p;
  for (int64_t i = 0; i < g.groups; ++i) {
    if (g.offsets[i] == 0 && !direct) continue;  // nothing moves (and a frame would be copied onto itself)
    for (int64_t step = 0; step < t_len; ++step) {
      const int64_t n = clip * t_len + (g.offsets[i] > 0 ? step : t_len - 1 - step);
      const int64_t s = g.source(n, i), at = n * frame + i * fold * step_in;
      add_runs(x + at, s < 0 ? nullptr : x + s * frame + i * fold * step_in, direct ? direct + at : nullptr, len,
               stride, count);
    }
  }
  if (!direct) return;
  for (int64_t t = 0; t < t_len; ++t) {
    const int64_t at = (clip * t_len + t) * frame + moved * step_in;
    add_runs(x + at, x + at, direct + at, g.channels_last ? c - moved : (c - moved) * p, stride, count);
  }
}

// count runs of len values: dst = a + b, either of which may be absent (zero); each with its own run stride. The
// usual lengths get a fixed-length loop (which the compiler unrolls).
template <typename T, int64_t Len>
void sum_fixed_runs(T* dst, int64_t dst_stride, const T* a, int64_t a_stride, const T* b, int64_t b_stride,
                    int64_t count) {
  for (int64_t r = 0; r < count; ++r) {
    T* d = dst + r * dst_stride;
    const T *x = a + r * a_stride, *y = b + r * b_stride;
    for (int64_t k = 0; k < Len; ++k) d[k] = x[k] + y[k];
  }
}

template <typename T>
void sum_runs(T* dst, int64_t dst_stride, const T* a, int64_t a_stride, const T* b, int64_t b_stride, int64_t len,
              int64_t count) {
  if (!a || !b) {
    if (a || b) return copy_runs(a ? a : b, a ? a_stride : b_stride, dst, dst_stride, len, count);
    return zero_runs(dst, dst_stride, len, count);
  }
  switch (len) {
    case 1: return sum_fixed_runs<T, 1>(dst, dst_stride, a, a_stride, b, b_stride, count);
    case 2: return sum_fixed_runs<T, 2>(dst, dst_stride, a, a_stride, b, b_stride, count);
    case 4: return sum_fixed_runs<T, 4>(dst, dst_stride, a, a_stride, b, b_stride, count);
    case 8: return sum_fixed_runs<T, 8>(dst, dst_stride, a, a_stride, b, b_stride, count);
    case 16: return sum_fixed_runs<T, 16>(dst, dst_stride, a, a_stride, b, b_stride, count);
    case 32: return sum_fixed_runs<T, 32>(dst, dst_stride, a, a_stride, b, b_stride, count);
    default:
      for (int64_t r = 0; r < count; ++r) {
        T* d = dst + r * dst_stride;
        const T *x = a + r * a_stride, *y = b + r * b_stride;
        for (int64_t k = 0; k < len; ++k) d[k] = x[k] + y[k];
      }
  }
}

// The usual channels-last move at compile time: clips of kUnitFrames frames, each group moved by -1, 0 or +1 frame,
// a group's values per pixel a power of two of 2-128 bytes (the moves are copies: the dtype does not matter). A
// pixel at a time, its group's values of all T frames are held in registers and written back moved, so each of x's
// cache lines is read and written once per pass (with C < 64 floats a pixel's moved channels share one line), and
// the T frames are T sequential streams. The general kernels (below: clip length, offsets and run length known at
// run time, the moved values through a buffer) take about 1.7 times as long on the demo's widest layer, and at the
// demo's sizes these passes are a few per cent of a training step (docs/models.md).
constexpr int64_t kUnitFrames = 8;
constexpr int64_t kPrefetchPixels = 8;  // x is often out of cache (in the backward): fetch 8 pixels ahead

// One group's move in a unit pass: its frame offset; with ``save``, the frame the move pushes out of the clip is kept
// there first; the frame left without a source takes ``fill``'s values (the kept ones, when moving back), or zero
// if it is null. save and fill hold Bytes per pixel.
struct UnitMove {
  int64_t offset;
  char* save;
  const char* fill;
};

template <int64_t Bytes, int64_t Offset>
inline void move_pixel_unit(char* px, int64_t frame_bytes, const UnitMove& mv, int64_t at) {
  if constexpr (Offset != 0) {
    struct Run {
      unsigned char b[Bytes];
    };
    constexpr int64_t save_first = Offset > 0 ? 0 : kUnitFrames - 1;  // the frame this move pushes out
    Run v[kUnitFrames];
    for (int64_t t = 0; t < kUnitFrames; ++t) std::memcpy(&v[t], px + t * frame_bytes, Bytes);
    if (mv.save) std::memcpy(mv.save + at, &v[save_first], Bytes);
    for (int64_t t = 0; t < kUnitFrames; ++t) {
      char* dst = px + t * frame_bytes;
      if (t + Offset >= 0 && t + Offset < kUnitFrames) {
        std::memcpy(dst, &v[t + Offset], Bytes);
      } else if (mv.fill) {
        std::memcpy(dst, mv.fill + at, Bytes);
      } else {
        std::memset(dst, 0, Bytes);
      }
    }
  }
}

// Pixels [p0, p0 + count) of one clip whose first frame starts at ``base``; group i's bytes at i * Bytes in a pixel.
template <int64_t Bytes, int64_t O0, int64_t O1>
void move_pixels_unit(char* base, int64_t frame_bytes, int64_t pixel_bytes, const UnitMove* moves, int64_t p0,
                      int64_t count) {
  for (int64_t p = p0; p < p0 + count; ++p) {
    char* px = base + p * pixel_bytes;
    if (p + kPrefetchPixels < p0 + count) {
      for (int64_t t = 0; t < kUnitFrames; ++t) {
        __builtin_prefetch(px + kPrefetchPixels * pixel_bytes + t * frame_bytes, 1);
      }
    }
    move_pixel_unit<Bytes, O0>(px, frame_bytes, moves[0], p * Bytes);
    move_pixel_unit<Bytes, O1>(px + Bytes, frame_bytes, moves[1], p * Bytes);
  }
}

template <int64_t Bytes>
void move_pixels_unit_offsets(char* base, int64_t frame_bytes, int64_t pixel_bytes, const UnitMove* moves, int64_t p0,
                              int64_t count) {
  auto run = [&](auto o0, auto o1) {
    move_pixels_unit<Bytes, decltype(o0)::value, decltype(o1)::value>(base, frame_bytes, pixel_bytes, moves, p0,
                                                                      count);
  };
  using M = std::integral_constant<int64_t, -1>;
  using Z = std::integral_constant<int64_t, 0>;
  using P = std::integral_constant<int64_t, 1>;
  switch ((moves[0].offset + 1) * 3 + moves[1].offset + 1) {
    case 0: return run(M{}, M{});
    case 1: return run(M{}, Z{});
    case 2: return run(M{}, P{});
    case 3: return run(Z{}, M{});
    case 5: return run(Z{}, P{});
    case 6: return run(P{}, M{});
    case 7: return run(P{}, Z{});
    case 8: return run(P{}, P{});
    default: return;  // nothing moves
  }
}

// Channels-last pixels [p0, p0 + count) of one clip (its first frame at ``base``) by the unit kernel, if it applies
// (else false, and nothing is done): moves[i] is group i's (offset 0 for a group that stays or does not exist).
bool move_pixels_by_unit(char* base, const Geometry& g, int64_t element_size, const UnitMove* moves, int64_t p0,
                         int64_t count) {
  if (g.num_frames != kUnitFrames) return false;
  for (int64_t i = 0; i < kMaxGroups; ++i) {
    if (moves[i].offset < -1 || moves[i].offset > 1) return false;
  }
  const int64_t frame_bytes = g.frame_size() * element_size, pixel_bytes = g.channels * element_size;
  switch (g.fold * element_size) {
    case 2: move_pixels_unit_offsets<2>(base, frame_bytes, pixel_bytes, moves, p0, count); return true;
    case 4: move_pixels_unit_offsets<4>(base, frame_bytes, pixel_bytes, moves, p0, count); return true;
    case 8: move_pixels_unit_offsets<8>(base, frame_bytes, pixel_bytes, moves, p0, count); return true;
    case 16: move_pixels_unit_offsets<16>(base, frame_bytes, pixel_bytes, moves, p0, count); return true;
    case 32: move_pixels_unit_offsets<32>(base, frame_bytes, pixel_bytes, moves, p0, count); return true;
    case 64: move_pixels_unit_offsets<64>(base, frame_bytes, pixel_bytes, moves, p0, count); return true;
    case 128: move_pixels_unit_offsets<128>(base, frame_bytes, pixel_bytes, moves, p0, count); return true;
    default: return false;
  }
}

// Channels-last pixels per work item (about 16 KB of a frame: with their T frames' moved values, they stay in L2).
int64_t pixel_chunk(const Geometry& g) { return std::max<int64_t>(1, 4096 / g.channels); }

// Channels-last: shift_add_clip for pixels [p0, p0 + count) of one clip. A pixel's moved channels share its cache
// lines, so their values of all T frames go into a small buffer first; then each frame's pixels get direct added
// in one contiguous (vectorised) pass, and the moved channels are overwritten with their sums while the frame is
// still in L1 (instead of a pass per group and a strided one for the rest).
template <typename T>
void shift_add_pixels(T* x, const T* direct, const Geometry& g, int64_t clip, int64_t p0, int64_t count,
                      std::vector<T>& buffer) {
  const int64_t t_len = g.num_frames, moved = g.moved(), c = g.channels, fold = g.fold;
  buffer.resize(t_len * count * moved);
  T* buf = buffer.data();
  auto at = [&](int64_t t) { return (clip * t_len + t) * g.frame_size() + p0 * c; };
  for (int64_t t = 0; t < t_len; ++t) copy_runs(x + at(t), c, buf + t * count * moved, moved, moved, count);
  for (int64_t t = 0; t < t_len; ++t) {
    if (direct) {
      T* d = x + at(t);
      const T* a = direct + at(t);
      for (int64_t k = 0; k < count * c; ++k) d[k] += a[k];
    }
    for (int64_t i = 0; i < g.groups; ++i) {
      const int64_t s = t + g.offsets[i];
      sum_runs(x + at(t) + i * fold, c, s >= 0 && s < t_len ? buf + s * count * moved + i * fold : nullptr, moved,
               direct ? direct + at(t) + i * fold : nullptr, c, fold, count);
    }
  }
}

// x shifted in place for as long as this lives (the conv and its weight gradient read x itself, no copy): the
// moved channels of each clip go along time, the frames a group pushes out of its clip (|offset| of T) kept aside;
// the destructor moves everything back and puts those frames back, so x is bit-identical afterwards, also when the
// code in between throws. Pure copies, so bit-exact. x is written through its data pointer: its autograd version
// does not change (nothing reads x in between: the guard's owner runs the conv on this thread, and CPU autograd
// runs one node at a time). NCHW moves each group's (frame, channel) planes, in the frame order that reads every
// source before it is overwritten; channels-last, where a pixel's moved channels share its cache lines, takes a
// chunk of pixels at a time: the unit kernel (8 frames, offsets of one) a pixel at a time, otherwise their moved
// values of all T frames into a small buffer, then written back shifted; either way x's lines are read and written
// once per pass whatever the number of groups.
class ShiftedInPlace {
 public:
  ShiftedInPlace(const Tensor& x, const Geometry& g) : x_(x), g_(g) {
    for (int64_t i = 0; i < g.groups; ++i) lost_ = std::max(lost_, lost(i));
    // a work item: NCHW, a clip, a group and 2k values of its plane; channels-last, a clip and pixel_chunk pixels
    units_ = g.channels_last ? g.pixels : g.fold * g.pixels;
    chunk_ = g.channels_last ? pixel_chunk(g) : 2048;
    chunks_ = (units_ + chunk_ - 1) / chunk_;
    if (lost_) saved_ = at::empty({g.frames / g.num_frames * g.groups * lost_ * g.fold * g.pixels}, x.options());
    run(true);
  }
  ~ShiftedInPlace() { run(false); }
  ShiftedInPlace(const ShiftedInPlace&) = delete;
  ShiftedInPlace& operator=(const ShiftedInPlace&) = delete;

 private:
  int64_t lost(int64_t i) const { return std::min(std::abs(g_.offsets[i]), g_.num_frames); }
  // the first frame group i pushes out of the clip: [0, L) when it takes later frames, [T-L, T) otherwise
  int64_t first_lost(int64_t i) const { return g_.offsets[i] > 0 ? 0 : g_.num_frames - lost(i); }

  void run(bool forward) {
    if (std::all_of(g_.offsets, g_.offsets + g_.groups, [](int64_t o) { return o == 0; })) return;  // nothing moves
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_.scalar_type(), "tsm_dist::shift_in_place", [&] {
      scalar_t* data = x_.mutable_data_ptr<scalar_t>();
      scalar_t* keep = lost_ ? saved_.mutable_data_ptr<scalar_t>() : nullptr;
      const int64_t groups = g_.channels_last ? 1 : g_.groups, items = g_.frames / g_.num_frames * groups * chunks_;
      const int64_t item_values = std::min(chunk_, units_) * (g_.channels_last ? g_.channels : 1) * g_.num_frames;
      at::parallel_for(0, items, std::max<int64_t>(1, kGrainElements / item_values), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> buffer;
        for (int64_t item = begin; item < end; ++item) {
          if (g_.channels_last) {
            move_pixels(data, keep, item / chunks_, item % chunks_, forward, buffer);
          } else {
            move_planes(data, keep, item / chunks_ / g_.groups, item / chunks_ % g_.groups, item % chunks_, forward);
          }
        }
      });
    });
  }

  template <typename T>
  T* kept(T* keep, int64_t clip, int64_t i, int64_t l) const {
    return keep + ((clip * g_.groups + i) * lost_ + l) * g_.fold * g_.pixels;
  }

  // NCHW: values [u0, u1) of group i's plane (fold * P values per frame) in one clip.
  template <typename T>
  void move_planes(T* x, T* keep, int64_t clip, int64_t i, int64_t chunk, bool forward) const {
    const int64_t offset = forward ? g_.offsets[i] : -g_.offsets[i], t_len = g_.num_frames;
    if (offset == 0) return;
    const int64_t u0 = chunk * chunk_, len = std::min(units_, u0 + chunk_) - u0, first = first_lost(i);
    auto at = [&](int64_t t) { return x + (clip * t_len + t) * g_.frame_size() + i * g_.fold * g_.pixels + u0; };
    if (forward) {
      for (int64_t l = 0; l < lost(i); ++l) std::memcpy(kept(keep, clip, i, l) + u0, at(first + l), sizeof(T) * len);
    }
    for (int64_t step = 0; step < t_len; ++step) {
      const int64_t t = offset > 0 ? step : t_len - 1 - step, s = t + offset;
      if (s >= 0 && s < t_len) {
        std::memcpy(at(t), at(s), sizeof(T) * len);
      } else if (forward) {
        std::fill_n(at(t), len, T(0));
      } else {  // moving back, the frames without a source are exactly the ones pushed out
        std::memcpy(at(t), kept(keep, clip, i, t - first) + u0, sizeof(T) * len);
      }
    }
  }

  // Channels-last: pixels of one chunk in one clip, every group.
  template <typename T>
  void move_pixels(T* x, T* keep, int64_t clip, int64_t chunk, bool forward, std::vector<T>& buffer) const {
    const Geometry& g = g_;
    const int64_t p0 = chunk * chunk_, count = std::min(units_, p0 + chunk_) - p0, t_len = g.num_frames;
    const int64_t moved = g.moved(), c = g.channels, fold = g.fold;
    UnitMove unit[kMaxGroups] = {};
    for (int64_t i = 0; i < g.groups; ++i) {
      const int64_t offset = forward ? g.offsets[i] : -g.offsets[i];
      if (offset == 0) continue;
      char* kept_i = reinterpret_cast<char*>(kept(keep, clip, i, 0));  // lost(i) >= 1 frame kept: keep exists
      unit[i] = {offset, forward ? kept_i : nullptr, forward ? nullptr : kept_i};
    }
    if (move_pixels_by_unit(reinterpret_cast<char*>(x + clip * t_len * g.frame_size()), g, sizeof(T), unit, p0,
                            count)) {
      return;  // the usual shift, at compile time
    }
    buffer.resize(t_len * count * moved);
    T* buf = buffer.data();
    auto at = [&](int64_t t) { return x + (clip * t_len + t) * g.frame_size() + p0 * c; };
    for (int64_t t = 0; t < t_len; ++t) copy_runs(at(t), c, buf + t * count * moved, moved, moved, count);
    for (int64_t i = 0; i < g.groups && forward; ++i) {
      for (int64_t l = 0; l < lost(i); ++l) {
        copy_runs(buf + (first_lost(i) + l) * count * moved + i * fold, moved, kept(keep, clip, i, l) + p0 * fold,
                  fold, fold, count);
      }
    }
    for (int64_t t = 0; t < t_len; ++t) {
      for (int64_t i = 0; i < g.groups; ++i) {
        const int64_t s = t + (forward ? g.offsets[i] : -g.offsets[i]);
        T* dst = at(t) + i * fold;
        if (s >= 0 && s < t_len) {
          copy_runs(buf + s * count * moved + i * fold, moved, dst, c, fold, count);
        } else if (forward) {
          zero_runs(dst, c, fold, count);
        } else {  // moving back, the frames without a source are exactly the ones pushed out
          copy_runs(kept(keep, clip, i, t - first_lost(i)) + p0 * fold, fold, dst, c, fold, count);
        }
      }
    }
  }

  Tensor x_;
  Geometry g_;
  Tensor saved_;
  int64_t lost_ = 0, units_ = 0, chunk_ = 1, chunks_ = 1;
};

Tensor shift_copy_cpu(const Tensor& x, int64_t num_frames, int64_t fold, IntArrayRef offsets) {
  const Geometry g = geometry(x, num_frames, fold, offsets);
  Tensor out = at::empty_like(x);  // x is dense: its strides are kept
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tsm_dist::shift_copy", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.frames, grain(g, g.frame_size()), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) shift_frame(src, dst, g, n);
    });
  });
  return out;
}

Tensor& shift_add_cpu(Tensor& x, const std::optional<Tensor>& direct, int64_t num_frames, int64_t fold,
                      IntArrayRef offsets) {
  const Geometry g = geometry(x, num_frames, fold, offsets);
  const bool add = direct.has_value() && direct->defined();
  TORCH_CHECK(!add || (direct->sizes() == x.sizes() && direct->strides() == x.strides() &&
                       direct->scalar_type() == x.scalar_type()),
              "tsm_dist::shift_add_: direct must have x's sizes, strides and dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tsm_dist::shift_add_", [&] {
    scalar_t* data = x.mutable_data_ptr<scalar_t>();
    const scalar_t* d = add ? direct->const_data_ptr<scalar_t>() : nullptr;
    if (!g.channels_last) {
      at::parallel_for(0, g.frames / num_frames, grain(g, g.frame_size() * num_frames),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t clip = begin; clip < end; ++clip) shift_add_clip(data, d, g, clip);
                       });
      return;
    }
    const int64_t chunk = pixel_chunk(g), chunks = (g.pixels + chunk - 1) / chunk;
    at::parallel_for(0, g.frames / num_frames * chunks, grain(g, chunk * g.channels * num_frames),
                     [&](int64_t begin, int64_t end) {
                       std::vector<scalar_t> buffer;
                       for (int64_t item = begin; item < end; ++item) {
                         const int64_t p0 = item % chunks * chunk, clip = item / chunks;
                         if (!d) {  // the move alone (the in-place op's gradient): a pixel at a time
                           UnitMove unit[kMaxGroups] = {};
                           for (int64_t i = 0; i < g.groups; ++i) unit[i] = {g.offsets[i], nullptr, nullptr};
                           if (move_pixels_by_unit(reinterpret_cast<char*>(data + clip * num_frames * g.frame_size()),
                                                   g, sizeof(scalar_t), unit, p0, std::min(chunk, g.pixels - p0))) {
                             continue;
                           }
                         }
                         shift_add_pixels(data, d, g, clip, p0, std::min(chunk, g.pixels - p0), buffer);
                       }
                     });
  });
  return x;
}

// The dispatcher's handles: calls through them are seen by dispatch modes (the op counter) and profilers.
Tensor call_shift_copy(const Tensor& x, int64_t num_frames, int64_t fold, IntArrayRef offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tsm_dist::shift_copy", "")
                       .typed<Tensor(const Tensor&, int64_t, int64_t, IntArrayRef)>();
  return op.call(x, num_frames, fold, offsets);
}

Tensor& call_shift_add_(Tensor& x, const std::optional<Tensor>& direct, int64_t num_frames, int64_t fold,
                        IntArrayRef offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tsm_dist::shift_add_", "")
                       .typed<Tensor&(Tensor&, const std::optional<Tensor>&, int64_t, int64_t, IntArrayRef)>();
  return op.call(x, direct, num_frames, fold, offsets);
}

std::vector<int64_t> opposite(std::vector<int64_t> offsets) {
  for (auto& o : offsets) o = -o;
  return offsets;
}

// A tensor with exactly ``strides`` (a parameter's gradient must have the parameter's: DDP and Horovod
// buckets expect it, and a channels-last weight would otherwise get a contiguous gradient).
Tensor with_strides(const Tensor& t, IntArrayRef strides) {
  if (t.strides() == strides) return t;
  return at::empty_strided(t.sizes(), strides, t.options()).copy_(t);
}

// The op's copy method, (conv2d(shift(x)), x): the conv reads a shifted copy of x, kept for the weight gradient.
// x comes back as the block's identity, so that the backward gets both of x's gradients: the shifted path's, moved
// back in place in convolution_backward's fresh result, and the identity's, added in the same pass (the sum
// autograd would make anyway for a tensor used twice).
struct ShiftedCopyConv : public torch::autograd::Function<ShiftedCopyConv> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const std::optional<Tensor>& bias, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                               int64_t num_frames, int64_t fold, std::vector<int64_t> offsets) {
    const Tensor input = call_shift_copy(x, num_frames, fold, offsets);
    const Tensor y = at::convolution(input, weight, bias, stride, padding, dilation, false, {0, 0}, groups);
    ctx->save_for_backward({input, weight});
    ctx->set_materialize_grads(false);  // an unused identity adds nothing (no zero tensor to add)
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["num_frames"] = num_frames;
    ctx->saved_data["fold"] = fold;
    ctx->saved_data["offsets"] = offsets;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return {y, x};  // x returned unmodified: autograd makes it a view of x with this node as its grad_fn
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &grad_identity = grads[1];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    Tensor grad_x, grad_w, grad_b;
    if (grads[0].defined()) {
      const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                     has_bias && ctx->needs_input_grad(2)};
      const std::vector<int64_t> bias_size{weight.size(0)};
      std::tie(grad_x, grad_w, grad_b) = at::convolution_backward(
          grads[0], input, weight, has_bias ? std::optional<IntArrayRef>(bias_size) : std::nullopt,
          ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
          ctx->saved_data["dilation"].toIntVector(), false, {0, 0}, ctx->saved_data["groups"].toInt(), mask);
    }
    if (grad_x.defined()) {
      // convolution_backward's result is fresh: ours to move back in place (made dense if it is not).
      if (!grad_x.is_contiguous(grad_x.suggest_memory_format())) {
        grad_x = grad_x.contiguous(input.suggest_memory_format());
      }
      const bool fused = grad_identity.defined() && grad_identity.strides() == grad_x.strides() &&
                         grad_identity.scalar_type() == grad_x.scalar_type();
      call_shift_add_(grad_x, fused ? std::optional<Tensor>(grad_identity) : std::nullopt,
                      ctx->saved_data["num_frames"].toInt(), ctx->saved_data["fold"].toInt(),
                      opposite(ctx->saved_data["offsets"].toIntVector()));
      if (grad_identity.defined() && !fused) grad_x.add_(grad_identity);
    } else {
      grad_x = grad_identity;
    }
    if (grad_w.defined()) grad_w = with_strides(grad_w, weight.strides());
    return {grad_x, grad_w, grad_b, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The in-place method's backward, as two hooks on the conv's own autograd node (ConvolutionBackward0, the node
// TSN's layer has; no autograd Function of ours): before it runs, x is shifted in place again, if the weight
// gradient is wanted (only it reads x's values); after it, x is restored and the input gradient, a fresh tensor,
// is moved back in place (the shift's backward). The identity's gradient is added by autograd, as for TSN. The
// restore also runs if the node is freed without its backward having finished (an error in between).
struct HookedInput {
  HookedInput(Tensor x, const Geometry& g, std::vector<int64_t> back) : x(std::move(x)), g(g), back(std::move(back)) {}
  Tensor x;
  Geometry g;
  std::vector<int64_t> back;  // the offsets that move the gradient back
  std::optional<ShiftedInPlace> shifted;
  torch::autograd::Node* node = nullptr;  // the conv's node, which owns the hooks (and so this)
};

struct ShiftBeforeBackward : public torch::autograd::FunctionPreHook {
  explicit ShiftBeforeBackward(std::shared_ptr<HookedInput> in) : in(std::move(in)) {}
  variable_list operator()(const variable_list& grads) override {
    if (!in->shifted && in->node->task_should_compute_output(1)) in->shifted.emplace(in->x, in->g);
    return grads;
  }
  std::shared_ptr<HookedInput> in;
};

struct MoveBackAfterBackward : public torch::autograd::FunctionPostHook {
  explicit MoveBackAfterBackward(std::shared_ptr<HookedInput> in) : in(std::move(in)) {}
  variable_list operator()(const variable_list& grad_inputs, const variable_list& /*grad_outputs*/) override {
    in->shifted.reset();
    variable_list out(grad_inputs);
    Tensor& grad_x = out[0];
    if (grad_x.defined()) {
      if (!grad_x.is_contiguous(grad_x.suggest_memory_format())) {
        grad_x = grad_x.contiguous(in->x.suggest_memory_format());
      }
      call_shift_add_(grad_x, std::nullopt, in->g.num_frames, in->g.fold, in->back);
    }
    return out;
  }
  std::shared_ptr<HookedInput> in;
};

// (conv2d(shift(x)), x) by the in-place method: x shifted in place around at::convolution, which records its own
// autograd node (saving x itself: no layer input is ever copied), and that node hooked (above).
std::tuple<Tensor, Tensor> shifted_conv2d_in_place(const Tensor& x, const Tensor& weight,
                                                   const std::optional<Tensor>& bias, IntArrayRef stride,
                                                   IntArrayRef padding, IntArrayRef dilation, int64_t groups,
                                                   int64_t num_frames, int64_t fold, IntArrayRef offsets) {
  const Geometry g = geometry(x, num_frames, fold, offsets);
  Tensor y;
  {
    ShiftedInPlace shifted(x, g);
    y = at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, groups);
  }
  const auto& node = y.grad_fn();
  if (node) {
    auto in = std::make_shared<HookedInput>(x, g, opposite(offsets.vec()));
    in->node = node.get();
    node->add_pre_hook(std::make_unique<ShiftBeforeBackward>(in));
    node->add_post_hook(std::make_unique<MoveBackAfterBackward>(in));
  }
  return {y, x};  // x itself: the identity, whose gradient autograd adds to the conv's
}

std::tuple<Tensor, Tensor> shifted_conv2d_autograd(const Tensor& x, const Tensor& weight,
                                                   const std::optional<Tensor>& bias, IntArrayRef stride,
                                                   IntArrayRef padding, IntArrayRef dilation, int64_t groups,
                                                   int64_t num_frames, int64_t fold, IntArrayRef offsets,
                                                   bool in_place) {
  if (in_place) {
    return shifted_conv2d_in_place(x, weight, bias, stride, padding, dilation, groups, num_frames, fold, offsets);
  }
  auto out = ShiftedCopyConv::apply(x, weight, bias, stride.vec(), padding.vec(), dilation.vec(), groups,
                                    num_frames, fold, offsets.vec());
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> shifted_conv2d_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                              IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                                              int64_t groups, int64_t num_frames, int64_t fold, IntArrayRef offsets,
                                              bool in_place) {
  if (!in_place) {
    return {at::convolution(call_shift_copy(x, num_frames, fold, offsets), weight, bias, stride, padding, dilation,
                            false, {0, 0}, groups),
            x.alias()};
  }
  ShiftedInPlace shifted(x, geometry(x, num_frames, fold, offsets));
  return {at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, groups), x.alias()};
}

}  // namespace

TORCH_LIBRARY(tsm_dist, m) {
  m.def("shift_copy(Tensor x, int num_frames, int fold, int[] offsets) -> Tensor");
  m.def("shift_add_(Tensor(a!) x, Tensor? direct, int num_frames, int fold, int[] offsets) -> Tensor(a!)");
  m.def("shifted_conv2d(Tensor(a) x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups, int num_frames, int fold, int[] offsets, bool in_place=True) -> (Tensor, Tensor(a))");
}

TORCH_LIBRARY_IMPL(tsm_dist, CPU, m) {
  m.impl("shift_copy", &shift_copy_cpu);
  m.impl("shift_add_", &shift_add_cpu);
  m.impl("shifted_conv2d", &shifted_conv2d_cpu);
}

TORCH_LIBRARY_IMPL(tsm_dist, Autograd, m) {
  m.impl("shifted_conv2d", &shifted_conv2d_autograd);
}

#ifdef TSM_DIST_PYTHON_ENTRY
// A shifted layer's call from Python without torch.ops: ``ShiftedConvPlan(stride, padding, dilation, groups,
// num_frames, fold, offsets, channels)`` holds a layer's fixed arguments once, and calls tsm_dist::shifted_conv2d
// through the dispatcher (so dispatch modes and profilers see the op, as before). A call through torch.ops converts
// every argument to a generic stack first: 14-20 us a call more than this entry, the op itself or torch.conv2d's
// binding on the demo's layers (docs/models.md). ``plan.take(x, weight, bias)`` also checks, in C++, what the
// layer's Python call checked before calling the op (shift_kernels.ShiftedConvCall: grad needed, a dense 4-d CPU
// input of the declared width in the conv's dtype, no autocast, no __torch_function__ to honour) and returns None
// where one does not hold, for the caller's Python path: between a step's kernels, where Python's own data is out of
// cache, each Python-level check cost microseconds (a shifted layer's Python call 16 us over TSN's conv module, the
// sixth pass in docs/models.md). The library is then also a Python extension module, tsm_dist_shift_ops
// (shift_native.py imports it from the same file after loading the ops).
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/python.h>

namespace {

// What every plan's take() reads: the ops turned off (shift_native.turned_off) and the copy method's size
// (shift_native.copying), set from Python by configure().
struct EntryConfig {
  bool enabled = true;
  int64_t copy_numel = 0;
};
EntryConfig entry_config;

class ShiftedConvPlan {
 public:
  ShiftedConvPlan(std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                  int64_t groups, int64_t num_frames, int64_t fold, std::vector<int64_t> offsets, int64_t channels)
      : stride_(std::move(stride)),
        padding_(std::move(padding)),
        dilation_(std::move(dilation)),
        offsets_(std::move(offsets)),
        groups_(groups),
        num_frames_(num_frames),
        fold_(fold),
        channels_(channels) {}

  std::tuple<Tensor, Tensor> operator()(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                        bool in_place) const {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("tsm_dist::shifted_conv2d", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                           IntArrayRef, IntArrayRef, IntArrayRef, int64_t, int64_t,
                                                           int64_t, IntArrayRef, bool)>();
    return op.call(x, weight, bias, stride_, padding_, dilation_, groups_, num_frames_, fold_, offsets_, in_place);
  }

  // The layer's (conv2d(shift(x)), x) through the op where the op takes this training step, else None.
  pybind11::object take(pybind11::handle x, pybind11::handle weight, pybind11::handle bias) const {
    const pybind11::object none = pybind11::none();
    // Exactly torch.Tensor or nn.Parameter (whose __torch_function__ is disabled) and no torch-function mode: a
    // subclass or a mode must see the op through torch.ops, which the Python path does.
    if (!entry_config.enabled || !at::GradMode::is_enabled() || at::impl::torch_function_mode_enabled() ||
        !THPVariable_CheckExact(x.ptr()) || !THPVariable_CheckExact(weight.ptr()) ||
        !(bias.is_none() || THPVariable_CheckExact(bias.ptr()))) {
      return none;
    }
    const Tensor& xt = THPVariable_Unpack(x.ptr());
    const Tensor& wt = THPVariable_Unpack(weight.ptr());
    std::optional<Tensor> bt;
    if (!bias.is_none()) bt = THPVariable_Unpack(bias.ptr());
    if (!(xt.requires_grad() || wt.requires_grad() || (bt && bt->requires_grad())) || !xt.device().is_cpu() ||
        xt.dim() != 4 || xt.size(1) != channels_ || wt.scalar_type() != xt.scalar_type() ||
        (bt && bt->scalar_type() != xt.scalar_type()) || at::autocast::is_autocast_enabled(at::kCPU) ||
        !(xt.is_contiguous() || xt.is_contiguous(at::MemoryFormat::ChannelsLast))) {
      return none;
    }
    const bool in_place = xt.numel() > entry_config.copy_numel;
    std::tuple<Tensor, Tensor> out;
    {
      pybind11::gil_scoped_release no_gil;
      out = (*this)(xt, wt, bt, in_place);
    }
    return pybind11::cast(std::move(out));
  }

 private:
  std::vector<int64_t> stride_, padding_, dilation_, offsets_;
  int64_t groups_, num_frames_, fold_, channels_;
};

}  // namespace

PYBIND11_MODULE(tsm_dist_shift_ops, m) {
  pybind11::class_<ShiftedConvPlan>(m, "ShiftedConvPlan")
      .def(pybind11::init<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, int64_t, int64_t, int64_t,
                          std::vector<int64_t>, int64_t>())
      .def("__call__", &ShiftedConvPlan::operator(), pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("take", &ShiftedConvPlan::take);
  m.def("configure", [](bool enabled, int64_t copy_numel) { entry_config = EntryConfig{enabled, copy_numel}; });
}
#endif  // TSM_DIST_PYTHON_ENTRY
