// Static KV cache of ssg_engine's Engine: one preallocated K/V buffer per batch that advances in lockstep
// through the scales (every row of the batch has the same length at every step, so positions are known
// on the host and no per-row index math is needed).
//
// The device write is the custom op `torch.ops.ssg_engine.kv_write_`: one `copy_` into a slice per
// buffer, no allocation, no host sync, so it can be captured in a CUDA graph. `StaticKVCache` checks
// every argument on the host before calling it and raises the Python class set by
// `_set_exception_type` (ssg_engine.kv_cache.KVCacheError).
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/util/StringUtil.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

namespace py = pybind11;

namespace ssg_engine {
namespace {

// k_cache[layer, :n, :, start:start + l] = k and the same for v; k, v are (n, H, l, D).
void kv_write_(at::Tensor& k_cache, at::Tensor& v_cache, int64_t layer, int64_t start, const at::Tensor& k,
               const at::Tensor& v) {
  TORCH_CHECK(k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes(), "kv_write_: caches must be 5-D and alike");
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "kv_write_: k and v must be (n, H, l, D) and alike");
  const int64_t n = k.size(0);
  const int64_t l = k.size(2);
  k_cache.select(0, layer).narrow(0, 0, n).narrow(2, start, l).copy_(k);
  v_cache.select(0, layer).narrow(0, 0, n).narrow(2, start, l).copy_(v);
}

struct KVError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

PyObject* g_kv_error_type = nullptr;

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw KVError(c10::str(args...));
}

std::string fmt_shape(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + ")";
}

class StaticKVCache {
 public:
  StaticKVCache(int64_t num_layers, int64_t batch, int64_t num_heads, int64_t max_len, int64_t head_dim,
                at::ScalarType dtype, at::Device device) {
    const std::pair<const char*, int64_t> sizes[] = {{"num_layers", num_layers}, {"batch", batch},
                                                     {"num_heads", num_heads},   {"max_len", max_len},
                                                     {"head_dim", head_dim}};
    for (const auto& [name, value] : sizes) {
      if (value <= 0) fail("StaticKVCache: ", name, " must be >= 1, got ", value);
    }
    const auto options = at::TensorOptions().dtype(dtype).device(device);
    k_cache_ = at::zeros({num_layers, batch, num_heads, max_len, head_dim}, options);
    v_cache_ = at::zeros({num_layers, batch, num_heads, max_len, head_dim}, options);
  }

  void write(int64_t layer, int64_t start, const at::Tensor& k, const at::Tensor& v) {
    check_layer("write", layer);
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
      if (t.dim() != 4 || t.size(0) < 1 || t.size(0) > batch() || t.size(1) != num_heads() || t.size(2) < 1 ||
          t.size(3) != head_dim()) {
        fail("write: ", name, " must have shape (n <= ", batch(), ", ", num_heads(), ", l >= 1, ", head_dim(),
             "), got ", fmt_shape(t.sizes()));
      }
      if (t.scalar_type() != k_cache_.scalar_type() || t.device() != k_cache_.device()) {
        fail("write: ", name, " is ", py::str(py::cast(t.scalar_type())).cast<std::string>(), " on ", t.device().str(),
             ", the cache is ", py::str(py::cast(k_cache_.scalar_type())).cast<std::string>(), " on ",
             k_cache_.device().str());
      }
    }
    if (v.sizes() != k.sizes()) fail("write: v has shape ", fmt_shape(v.sizes()), ", k has ", fmt_shape(k.sizes()));
    if (start < 0 || start + k.size(2) > max_len()) {
      fail("write: positions [", start, ", ", start + k.size(2), ") are outside the cache's [0, ", max_len(), ")");
    }
    kv_write_(k_cache_, v_cache_, layer, start, k, v);
  }

  std::tuple<at::Tensor, at::Tensor> read(int64_t layer, int64_t n, int64_t length) const {
    check_layer("read", layer);
    if (n < 1 || n > batch()) fail("read: n must be in [1, ", batch(), "], got ", n);
    if (length < 1 || length > max_len()) fail("read: length must be in [1, ", max_len(), "], got ", length);
    return {k_cache_.select(0, layer).narrow(0, 0, n).narrow(2, 0, length),
            v_cache_.select(0, layer).narrow(0, 0, n).narrow(2, 0, length)};
  }

  int64_t nbytes() const { return 2 * k_cache_.numel() * k_cache_.element_size(); }
  const at::Tensor& k_cache() const { return k_cache_; }
  const at::Tensor& v_cache() const { return v_cache_; }
  int64_t num_layers() const { return k_cache_.size(0); }
  int64_t batch() const { return k_cache_.size(1); }
  int64_t num_heads() const { return k_cache_.size(2); }
  int64_t max_len() const { return k_cache_.size(3); }
  int64_t head_dim() const { return k_cache_.size(4); }

 private:
  void check_layer(const char* what, int64_t layer) const {
    if (layer < 0 || layer >= num_layers()) fail(what, ": layer must be in [0, ", num_layers(), "), got ", layer);
  }

  at::Tensor k_cache_, v_cache_;
};

}  // namespace
}  // namespace ssg_engine

TORCH_LIBRARY(ssg_engine, m) {
  m.def("kv_write_(Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, int start, Tensor k, Tensor v) -> ()");
}

TORCH_LIBRARY_IMPL(ssg_engine, CompositeExplicitAutograd, m) {
  m.impl("kv_write_", &ssg_engine::kv_write_);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using ssg_engine::StaticKVCache;
  m.doc() = "ssg_engine C++ extension: the Engine's static KV cache (device write: torch.ops.ssg_engine.kv_write_)";

  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ssg_engine::KVError& e) {
      PyErr_SetString(ssg_engine::g_kv_error_type ? ssg_engine::g_kv_error_type : PyExc_ValueError, e.what());
    }
  });

  m.def(
      "_set_exception_type",
      [](py::object kv_error) {
        ssg_engine::g_kv_error_type = kv_error.release().ptr();  // kept for the life of the process
      },
      "Set the Python exception class raised for invalid use of a cache.");

  py::class_<StaticKVCache>(m, "StaticKVCache",
                            "K/V buffers (num_layers, batch, num_heads, max_len, head_dim) for one batch that "
                            "advances in lockstep.")
      .def(py::init([](int64_t num_layers, int64_t batch, int64_t num_heads, int64_t max_len, int64_t head_dim,
                       at::ScalarType dtype, const py::object& device) {
             const auto dev = py::module_::import("torch").attr("device")(device).cast<at::Device>();
             return StaticKVCache(num_layers, batch, num_heads, max_len, head_dim, dtype, dev);
           }),
           py::arg("num_layers"), py::arg("batch"), py::arg("num_heads"), py::arg("max_len"), py::arg("head_dim"),
           py::arg("dtype") = at::kFloat, py::arg("device") = "cpu")
      .def_property_readonly("k_cache", &StaticKVCache::k_cache)
      .def_property_readonly("v_cache", &StaticKVCache::v_cache)
      .def_property_readonly("num_layers", &StaticKVCache::num_layers)
      .def_property_readonly("batch", &StaticKVCache::batch)
      .def_property_readonly("num_heads", &StaticKVCache::num_heads)
      .def_property_readonly("max_len", &StaticKVCache::max_len)
      .def_property_readonly("head_dim", &StaticKVCache::head_dim)
      .def("nbytes", &StaticKVCache::nbytes, "Bytes held by the K and V buffers.")
      .def("write", &StaticKVCache::write, py::arg("layer"), py::arg("start"), py::arg("k"), py::arg("v"),
           "Write k, v (n, H, l, D) at positions [start, start + l) of rows :n of `layer` (no sync, no realloc).")
      .def("read", &StaticKVCache::read, py::arg("layer"), py::arg("n"), py::arg("length"),
           "K, V views (n, H, length, D): rows :n, positions [0, length) of `layer`.");
}
