// Static KV-cache pool for ssg_engine: preallocated K/V storage plus a slot
// allocator whose bookkeeping (allocation bitmap, per-slot fill lengths) lives
// on the host, so every validity check runs without a device sync.
//
// The device write is the custom op `torch.ops.ssg_engine.kv_append_`, written
// with ATen tensor ops only (positions are computed on the device from
// `lengths`), so it runs on whatever device the tensors live on and can be
// captured in a CUDA graph.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace ssg_engine {
namespace {

// ---------------------------------------------------------------------------
// The custom op: writes k, v (n, H, l, D) at positions
// [lengths[slot], lengths[slot] + l) of each slot of one layer.
// ---------------------------------------------------------------------------
void kv_append_(
    at::Tensor& k_cache,
    at::Tensor& v_cache,
    const at::Tensor& lengths,
    int64_t layer,
    const at::Tensor& slots,
    const at::Tensor& k,
    const at::Tensor& v) {
  TORCH_CHECK(k_cache.dim() == 5, "kv_append_: k_cache must be 5-D (layers, capacity, H, max_len, D)");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "kv_append_: v_cache shape differs from k_cache");
  TORCH_CHECK(layer >= 0 && layer < k_cache.size(0), "kv_append_: layer ", layer, " out of range");
  TORCH_CHECK(lengths.dim() == 1 && lengths.scalar_type() == at::kLong, "kv_append_: lengths must be 1-D int64");
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong, "kv_append_: slots must be 1-D int64");
  const int64_t n = slots.size(0);
  const int64_t num_heads = k_cache.size(2);
  const int64_t head_dim = k_cache.size(4);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == n && k.size(1) == num_heads && k.size(3) == head_dim,
              "kv_append_: k must be (n, H, l, D) = (", n, ", ", num_heads, ", l, ", head_dim, "), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "kv_append_: v shape ", v.sizes(), " differs from k shape ", k.sizes());
  const int64_t l = k.size(2);

  const at::Tensor start = lengths.index_select(0, slots);                   // (n,)
  const at::Tensor pos = start.unsqueeze(1) + at::arange(l, slots.options());  // (n, l)
  const at::Tensor heads = at::arange(num_heads, slots.options());             // (H,)
  const c10::List<std::optional<at::Tensor>> index(
      {slots.view({n, 1, 1}), heads.view({1, num_heads, 1}), pos.view({n, 1, l})});
  k_cache.select(0, layer).index_put_(index, k);
  v_cache.select(0, layer).index_put_(index, v);
}

// ---------------------------------------------------------------------------
// Errors. The Python wrapper registers its exception classes through
// _set_exception_types; until then the builtins are used.
// ---------------------------------------------------------------------------
struct PoolExhausted : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct KVError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

PyObject* g_pool_exhausted_type = nullptr;
PyObject* g_kv_error_type = nullptr;

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw KVError(c10::str(args...));
}

std::string fmt_shape(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return out + ")";
}

std::string fmt_dtype(at::ScalarType dtype) {
  return py::str(py::cast(dtype));
}

// ---------------------------------------------------------------------------
// The pool.
// ---------------------------------------------------------------------------
class KVCachePool {
 public:
  KVCachePool(int64_t num_layers, int64_t capacity, int64_t num_heads, int64_t max_len, int64_t head_dim,
              at::ScalarType dtype, at::Device device)
      : num_layers_(num_layers),
        capacity_(capacity),
        num_heads_(num_heads),
        max_len_(max_len),
        head_dim_(head_dim) {
    const std::pair<const char*, int64_t> sizes[] = {{"num_layers", num_layers}, {"capacity", capacity},
                                                     {"num_heads", num_heads},   {"max_len", max_len},
                                                     {"head_dim", head_dim}};
    for (const auto& [name, value] : sizes) {
      if (value <= 0) fail("KVCachePool: ", name, " must be >= 1, got ", value);
    }
    const auto options = at::TensorOptions().dtype(dtype).device(device);
    k_cache_ = at::zeros({num_layers, capacity, num_heads, max_len, head_dim}, options);
    v_cache_ = at::zeros({num_layers, capacity, num_heads, max_len, head_dim}, options);
    lengths_ = at::zeros({capacity}, options.dtype(at::kLong));
    host_len_.assign(capacity, 0);
    allocated_.assign(capacity, 0);
    owner_.assign(capacity, nullptr);
    num_free_ = capacity;
  }

  at::Tensor allocate(int64_t n, bool contiguous) {
    if (n <= 0) fail("allocate: n must be >= 1, got ", n);
    if (n > num_free_) {
      throw PoolExhausted(c10::str("pool exhausted: asked for ", n, " slots, ", num_free_, " free (capacity ",
                                   capacity_, ")"));
    }
    std::vector<int64_t> ids;
    ids.reserve(n);
    if (contiguous) {
      int64_t run = 0, longest = 0, start = -1;
      for (int64_t s = 0; s < capacity_; ++s) {
        run = allocated_[s] ? 0 : run + 1;
        longest = std::max(longest, run);
        if (run == n) {
          start = s - n + 1;
          break;
        }
      }
      if (start < 0) {
        throw PoolExhausted(c10::str("pool exhausted: no contiguous run of ", n, " free slots (free ", num_free_,
                                     ", longest run ", longest, "); pass contiguous=False to accept scattered slots"));
      }
      for (int64_t i = 0; i < n; ++i) ids.push_back(start + i);
    } else {
      for (int64_t s = 0; s < capacity_ && static_cast<int64_t>(ids.size()) < n; ++s) {
        if (!allocated_[s]) ids.push_back(s);
      }
    }

    at::Tensor slots;
    {
      // A normal (non-inference) tensor, so its version counter tells us
      // whether it was modified in place after we recorded its contents.
      c10::InferenceMode not_inference(false);
      slots = at::tensor(ids, at::TensorOptions().dtype(at::kLong)).to(k_cache_.device());
    }
    lengths_.index_fill_(0, slots, 0);
    const c10::StorageImpl* key = slots.storage().unsafeGetStorageImpl();
    for (int64_t s : ids) {
      allocated_[s] = 1;
      host_len_[s] = 0;
      owner_[s] = key;
    }
    num_free_ -= n;
    records_[key] = SlotRecord{slots, ids, slots._version()};
    return slots;
  }

  void free(const std::vector<int64_t>& ids) {
    check_ids("free", ids, /*double_free_hint=*/true);
    for (int64_t s : ids) {
      drop_record(owner_[s]);
      allocated_[s] = 0;
    }
    num_free_ += static_cast<int64_t>(ids.size());
  }

  void free_tensor(const at::Tensor& slots) {
    free(host_ids("free", slots));
  }

  int64_t fill_length(int64_t slot) const {
    check_ids("fill_length", {slot}, false);
    return host_len_[slot];
  }

  void append(int64_t layer, const at::Tensor& slots, const at::Tensor& k, const at::Tensor& v) {
    check_layer("append", layer);
    const std::vector<int64_t> ids = host_ids("append", slots);
    const int64_t n = static_cast<int64_t>(ids.size());
    check_kv("k", k, n);
    check_kv("v", v, n);
    if (v.sizes() != k.sizes()) {
      fail("append: k and v shapes differ: ", fmt_shape(k.sizes()), " vs ", fmt_shape(v.sizes()));
    }
    check_ids("append", ids, false);
    check_room("append", ids, k.size(2));

    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("ssg_engine::kv_append_", "")
                               .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&)>();
    op.call(k_cache_, v_cache_, lengths_, layer, slots, k, v);
  }

  void advance(const at::Tensor& slots, int64_t l) {
    const std::vector<int64_t> ids = host_ids("advance", slots);
    if (l <= 0) fail("advance: l must be >= 1, got ", l);
    check_ids("advance", ids, false);
    check_room("advance", ids, l);
    lengths_.index_add_(0, slots, at::full({static_cast<int64_t>(ids.size())}, l, lengths_.options()));
    for (int64_t s : ids) host_len_[s] += l;
  }

  std::tuple<at::Tensor, at::Tensor> view(int64_t layer, const at::Tensor& slots, int64_t length) {
    check_layer("view", layer);
    const std::vector<int64_t> ids = host_ids("view", slots);
    if (length <= 0 || length > max_len_) fail("view: length must be in [1, ", max_len_, "], got ", length);
    check_ids("view", ids, false);
    const at::Tensor k = k_cache_.select(0, layer).narrow(2, 0, length);
    const at::Tensor v = v_cache_.select(0, layer).narrow(2, 0, length);
    const int64_t n = static_cast<int64_t>(ids.size());
    bool run = true;
    for (int64_t i = 1; i < n && run; ++i) run = ids[i] == ids[0] + i;
    if (run) return {k.narrow(0, ids[0], n), v.narrow(0, ids[0], n)};
    return {k.index_select(0, slots), v.index_select(0, slots)};
  }

  void reset(const std::vector<int64_t>& ids) {
    check_ids("reset", ids, false);
    reset_with_index(ids, at::tensor(ids, at::TensorOptions().dtype(at::kLong)).to(k_cache_.device()));
  }

  void reset_tensor(const at::Tensor& slots) {
    const std::vector<int64_t> ids = host_ids("reset", slots);
    check_ids("reset", ids, false);
    reset_with_index(ids, slots);
  }

  const at::Tensor& k_cache() const { return k_cache_; }
  const at::Tensor& v_cache() const { return v_cache_; }
  const at::Tensor& lengths() const { return lengths_; }
  int64_t num_free() const { return num_free_; }
  int64_t num_layers() const { return num_layers_; }
  int64_t capacity() const { return capacity_; }
  int64_t num_heads() const { return num_heads_; }
  int64_t max_len() const { return max_len_; }
  int64_t head_dim() const { return head_dim_; }

 private:
  // What an allocate() call returned: its tensor (kept alive so the storage
  // key stays unique), its host-side contents and its version at that time.
  struct SlotRecord {
    at::Tensor tensor;
    std::vector<int64_t> ids;
    int64_t version;
  };

  void check_layer(const char* op, int64_t layer) const {
    if (layer < 0 || layer >= num_layers_) fail(op, ": layer ", layer, " out of range [0, ", num_layers_, ")");
  }

  // Host copy of a slots tensor. Tensors returned by allocate() (and views of
  // them that were not modified in place) are resolved from the record with no
  // device access; any other tensor is read back (a device sync off the CPU).
  std::vector<int64_t> host_ids(const char* op, const at::Tensor& slots) const {
    if (!slots.defined() || slots.dim() != 1 || slots.scalar_type() != at::kLong ||
        slots.device() != k_cache_.device()) {
      if (!slots.defined()) fail(op, ": slots tensor is undefined");
      fail(op, ": slots must be a 1-D int64 tensor on ", k_cache_.device().str(), ", got ", slots.dim(), "-D ",
           fmt_dtype(slots.scalar_type()), " on ", slots.device().str());
    }
    const int64_t n = slots.size(0);
    if (n == 0) fail(op, ": no slots given");
    if (!slots.is_inference()) {
      const auto it = records_.find(slots.storage().unsafeGetStorageImpl());
      if (it != records_.end() && it->second.version == slots._version()) {
        const SlotRecord& rec = it->second;
        const int64_t base = slots.storage_offset() - rec.tensor.storage_offset();
        const int64_t stride = slots.stride(0);
        const int64_t size = static_cast<int64_t>(rec.ids.size());
        const int64_t first = base, last = base + (n - 1) * stride;
        if (std::min(first, last) >= 0 && std::max(first, last) < size) {
          std::vector<int64_t> ids(n);
          for (int64_t i = 0; i < n; ++i) ids[i] = rec.ids[base + i * stride];
          return ids;
        }
      }
    }
    const at::Tensor host = slots.to(at::kCPU).contiguous();
    const int64_t* data = host.data_ptr<int64_t>();
    return std::vector<int64_t>(data, data + n);
  }

  // Range, duplicate and allocation checks on host ids (no device access).
  void check_ids(const char* op, const std::vector<int64_t>& ids, bool double_free_hint) const {
    if (ids.empty()) fail(op, ": no slots given");
    std::vector<uint8_t> seen(capacity_, 0);
    for (int64_t s : ids) {
      if (s < 0 || s >= capacity_) fail(op, ": slot id ", s, " out of range [0, ", capacity_, ")");
      if (seen[s]) fail(op, ": duplicate slot id ", s);
      seen[s] = 1;
      if (!allocated_[s]) fail(op, ": slot ", s, " is not allocated", double_free_hint ? " (double free?)" : "");
    }
  }

  void check_room(const char* op, const std::vector<int64_t>& ids, int64_t l) const {
    for (int64_t s : ids) {
      if (l > max_len_ - host_len_[s]) {
        fail(op, ": slot ", s, " has length ", host_len_[s], "; adding ", l, " tokens exceeds max_len ", max_len_,
             " (room for ", max_len_ - host_len_[s], ")");
      }
    }
  }

  void check_kv(const char* name, const at::Tensor& t, int64_t n) const {
    if (!t.defined()) fail("append: ", name, " is undefined");
    if (t.scalar_type() != k_cache_.scalar_type()) {
      fail("append: ", name, " dtype ", fmt_dtype(t.scalar_type()), " does not match the pool dtype ",
           fmt_dtype(k_cache_.scalar_type()));
    }
    if (t.device() != k_cache_.device()) {
      fail("append: ", name, " is on ", t.device().str(), " but the pool is on ", k_cache_.device().str());
    }
    const bool ok = t.dim() == 4 && t.size(0) == n && t.size(1) == num_heads_ && t.size(2) >= 1 &&
                    t.size(3) == head_dim_;
    if (!ok) {
      fail("append: ", name, " must have shape (n, H, l, D) = (", n, ", ", num_heads_, ", l>=1, ", head_dim_,
           "), got ", fmt_shape(t.sizes()));
    }
  }

  // Forget the record of an allocate() call once any of its slots is freed.
  void drop_record(const c10::StorageImpl* key) {
    const auto it = records_.find(key);
    if (it == records_.end()) return;
    for (int64_t s : it->second.ids) {
      if (owner_[s] == key) owner_[s] = nullptr;
    }
    records_.erase(it);
  }

  void reset_with_index(const std::vector<int64_t>& ids, const at::Tensor& index) {
    lengths_.index_fill_(0, index, 0);
    for (int64_t s : ids) host_len_[s] = 0;
  }

  int64_t num_layers_, capacity_, num_heads_, max_len_, head_dim_;
  at::Tensor k_cache_, v_cache_, lengths_;
  std::vector<int64_t> host_len_;
  std::vector<uint8_t> allocated_;
  std::vector<const c10::StorageImpl*> owner_;  // record of the allocate() that handed out each slot
  std::unordered_map<const c10::StorageImpl*, SlotRecord> records_;
  int64_t num_free_ = 0;
};

}  // namespace
}  // namespace ssg_engine

TORCH_LIBRARY(ssg_engine, m) {
  m.def(
      "kv_append_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor lengths, int layer, Tensor slots, Tensor k, "
      "Tensor v) -> ()");
}

TORCH_LIBRARY_IMPL(ssg_engine, CompositeExplicitAutograd, m) {
  m.impl("kv_append_", &ssg_engine::kv_append_);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using ssg_engine::KVCachePool;
  m.doc() = "ssg_engine C++ extension: KV-cache pool (the append op is torch.ops.ssg_engine.kv_append_)";

  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ssg_engine::PoolExhausted& e) {
      PyErr_SetString(ssg_engine::g_pool_exhausted_type ? ssg_engine::g_pool_exhausted_type : PyExc_RuntimeError,
                      e.what());
    } catch (const ssg_engine::KVError& e) {
      PyErr_SetString(ssg_engine::g_kv_error_type ? ssg_engine::g_kv_error_type : PyExc_ValueError, e.what());
    }
  });

  m.def(
      "_set_exception_types",
      [](py::object pool_exhausted, py::object kv_error) {
        // Kept for the life of the process (the translator may run until exit).
        ssg_engine::g_pool_exhausted_type = pool_exhausted.release().ptr();
        ssg_engine::g_kv_error_type = kv_error.release().ptr();
      },
      "Set the Python exception classes raised for pool exhaustion and for other pool errors.");

  py::class_<KVCachePool>(m, "KVCachePool",
                          "Preallocated K/V cache of shape (num_layers, capacity, num_heads, max_len, head_dim) "
                          "with a host-side slot allocator.")
      .def(py::init([](int64_t num_layers, int64_t capacity, int64_t num_heads, int64_t max_len, int64_t head_dim,
                       at::ScalarType dtype, const py::object& device) {
             const auto dev = py::module_::import("torch").attr("device")(device).cast<at::Device>();
             return KVCachePool(num_layers, capacity, num_heads, max_len, head_dim, dtype, dev);
           }),
           py::arg("num_layers"), py::arg("capacity"), py::arg("num_heads"), py::arg("max_len"),
           py::arg("head_dim"), py::arg("dtype") = at::kFloat, py::arg("device") = "cpu")
      .def_property_readonly("k_cache", &KVCachePool::k_cache, "(num_layers, capacity, num_heads, max_len, head_dim)")
      .def_property_readonly("v_cache", &KVCachePool::v_cache, "(num_layers, capacity, num_heads, max_len, head_dim)")
      .def_property_readonly("lengths", &KVCachePool::lengths, "(capacity,) int64 per-slot fill length on the device")
      .def_property_readonly("num_free", &KVCachePool::num_free)
      .def_property_readonly("num_layers", &KVCachePool::num_layers)
      .def_property_readonly("capacity", &KVCachePool::capacity)
      .def_property_readonly("num_heads", &KVCachePool::num_heads)
      .def_property_readonly("max_len", &KVCachePool::max_len)
      .def_property_readonly("head_dim", &KVCachePool::head_dim)
      .def("allocate", &KVCachePool::allocate, py::arg("n"), py::arg("contiguous") = true,
           "Allocate n slots; returns their int64 ids (n,) on the device (lowest run when contiguous).")
      .def("free", &KVCachePool::free_tensor, py::arg("slots"), "Free slots (tensor or sequence of ints).")
      .def("free", &KVCachePool::free, py::arg("slots"))
      .def("fill_length", &KVCachePool::fill_length, py::arg("slot"), "Host-side fill length of one slot.")
      .def("append", &KVCachePool::append, py::arg("layer"), py::arg("slots"), py::arg("k"), py::arg("v"),
           "Write k, v (n, H, l, D) after each slot's current length in `layer` (no sync, no realloc).")
      .def("advance", &KVCachePool::advance, py::arg("slots"), py::arg("l"), "lengths[slots] += l.")
      .def("view", &KVCachePool::view, py::arg("layer"), py::arg("slots"), py::arg("length"),
           "K, V (n, H, length, D) of these slots: a view for a contiguous run, else a gather.")
      .def("reset", &KVCachePool::reset_tensor, py::arg("slots"), "Set the lengths of slots to 0 (keeps them).")
      .def("reset", &KVCachePool::reset, py::arg("slots"));
}
