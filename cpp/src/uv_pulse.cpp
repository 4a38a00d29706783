#include "loopguard/uv_pulse.h"

#include <dlfcn.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "loopguard/engine.h"

namespace loopguard {

namespace {

// libuv's handle types as its public uv_handle_type enum numbers them; stable across 1.x, and
// checked in every handle libuv initialised (its type field) before the handle is started.
constexpr int kUvCheck = 2;
constexpr int kUvPrepare = 9;

using HandleCb = void (*)(void* handle);

// The few libuv functions the pulse needs, as the library exports them.
struct UvApi {
  std::size_t (*handle_size)(int type) = nullptr;
  int (*prepare_init)(void* loop, void* handle) = nullptr;
  int (*prepare_start)(void* handle, HandleCb cb) = nullptr;
  int (*prepare_stop)(void* handle) = nullptr;
  int (*check_init)(void* loop, void* handle) = nullptr;
  int (*check_start)(void* handle, HandleCb cb) = nullptr;
  int (*check_stop)(void* handle) = nullptr;
  void (*close)(void* handle, HandleCb cb) = nullptr;
  void (*unref)(void* handle) = nullptr;
};

template <typename F>
bool resolve(void* lib, const char* name, F& out) {
  void* symbol = ::dlsym(lib, name);
  if (symbol == nullptr) return false;
  out = reinterpret_cast<F>(symbol);
  return true;
}

bool load_api(const std::string& library, UvApi& api, std::string& why) {
  // The library is normally loaded already (uvloop's extension): take that very copy. It is never
  // closed again, since the handles' callbacks and close callbacks live in it too.
  void* lib = ::dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  if (lib == nullptr) lib = ::dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    why = "cannot open " + library;
    return false;
  }
  const bool ok = resolve(lib, "uv_handle_size", api.handle_size) &&
                  resolve(lib, "uv_prepare_init", api.prepare_init) &&
                  resolve(lib, "uv_prepare_start", api.prepare_start) &&
                  resolve(lib, "uv_prepare_stop", api.prepare_stop) &&
                  resolve(lib, "uv_check_init", api.check_init) &&
                  resolve(lib, "uv_check_start", api.check_start) &&
                  resolve(lib, "uv_check_stop", api.check_stop) &&
                  resolve(lib, "uv_close", api.close) && resolve(lib, "uv_unref", api.unref);
  if (!ok) why = library + " does not export libuv's prepare/check API";
  return ok;
}

// Reads one pointer at `address` without trusting it: process_vm_readv on our own process returns
// an error for an unmapped address instead of faulting.
bool safe_read_pointer(std::uintptr_t address, void*& out) {
  if (address == 0 || address % alignof(void*) != 0) return false;
  iovec local{&out, sizeof out};
  iovec remote{reinterpret_cast<void*>(address), sizeof out};
  return ::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0) ==
         static_cast<ssize_t>(sizeof out);
}

// Each handle's data field (the first of every libuv handle) points at one of these: the
// handle keeps the control block alive until its close callback has run.
using ControlRef = std::shared_ptr<UvControl>;

}  // namespace

struct UvControl {
  UvApi api;
  std::mutex mutex;  // held while a callback drives the engine, and to change it
  Engine* engine = nullptr;
  std::atomic<bool> forgotten{false};  // set after fork(): callbacks do nothing, take no lock
  void* prepare = nullptr;
  void* check = nullptr;
};

namespace {

UvControl& control_of(void* handle) {
  const ControlRef* ref = *static_cast<ControlRef**>(handle);
  return **ref;
}

void on_prepare(void* handle) {
  UvControl& c = control_of(handle);
  if (c.forgotten.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> lock(c.mutex);
  // About to poll: the loop waits from here. If that ends a stall, finish it now, so its events
  // are in the notify pipe before the poll returns (uv_run runs without the GIL).
  if (c.engine != nullptr && c.engine->wait_begin()) (void)c.engine->settle(true);
}

void on_check(void* handle) {
  UvControl& c = control_of(handle);
  if (c.forgotten.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.engine != nullptr) c.engine->wait_end();
}

void on_close(void* handle) {
  delete *static_cast<ControlRef**>(handle);
  std::free(handle);
}

// A zeroed handle, large enough for either kind whatever the enum numbers turn out to be (the
// size is asked for by type number, and a wrong number must not make the block too small).
void* new_handle(const UvApi& api) {
  const std::size_t size =
      std::max({api.handle_size(kUvPrepare), api.handle_size(kUvCheck), std::size_t{512}});
  return std::calloc(1, size);
}

// What uv_xxx_init wrote into the handle's public fields: { void* data; uv_loop_t* loop;
// uv_handle_type type; ... }, the layout every libuv 1.x handle starts with.
bool initialised_as(const void* handle, const void* loop, int type) {
  const auto* bytes = static_cast<const unsigned char*>(handle);
  void* owner = nullptr;
  int kind = -1;
  std::memcpy(&owner, bytes + sizeof(void*), sizeof owner);
  std::memcpy(&kind, bytes + 2 * sizeof(void*), sizeof kind);
  return owner == loop && kind == type;
}

}  // namespace

void* UvPulse::find_uv_loop(const void* loop_object) {
  if (loop_object == nullptr) return nullptr;
  // After the object header (16 bytes on every supported CPython build) and Cython's vtable
  // pointer; a few neighbouring slots are tried so a slightly different header still works, and
  // only a candidate whose data points back at the object is taken.
  const auto base = reinterpret_cast<std::uintptr_t>(loop_object);
  for (std::size_t offset = 16; offset <= 48; offset += sizeof(void*)) {
    void* candidate = nullptr;
    void* data = nullptr;
    if (!safe_read_pointer(base + offset, candidate)) continue;
    if (!safe_read_pointer(reinterpret_cast<std::uintptr_t>(candidate), data)) continue;
    if (data == loop_object) return candidate;
  }
  return nullptr;
}

std::shared_ptr<UvPulse> UvPulse::attach(const void* loop_object, const std::string& library,
                                         std::string& why) {
  auto control = std::make_shared<UvControl>();
  if (!load_api(library, control->api, why)) return nullptr;
  void* loop = find_uv_loop(loop_object);
  if (loop == nullptr) {
    why = "the loop's libuv handle was not found where uvloop keeps it";
    return nullptr;
  }
  const UvApi& api = control->api;
  void* prepare = new_handle(api);
  void* check = new_handle(api);
  if (prepare == nullptr || check == nullptr || api.prepare_init(loop, prepare) != 0) {
    std::free(prepare);
    std::free(check);
    why = "libuv refused a prepare handle";
    return nullptr;
  }
  *static_cast<ControlRef**>(prepare) = new ControlRef(control);
  if (api.check_init(loop, check) != 0) {
    std::free(check);
    api.close(prepare, on_close);  // initialised: only libuv may free it now
    why = "libuv refused a check handle";
    return nullptr;
  }
  *static_cast<ControlRef**>(check) = new ControlRef(control);
  if (!initialised_as(prepare, loop, kUvPrepare) || !initialised_as(check, loop, kUvCheck)) {
    api.close(prepare, on_close);
    api.close(check, on_close);
    why = "libuv's handles are not laid out as libuv 1.x lays them out";
    return nullptr;
  }
  control->prepare = prepare;
  control->check = check;
  api.prepare_start(prepare, on_prepare);
  api.check_start(check, on_check);
  // Never what keeps uv_run going: the loop stops exactly as it would without us.
  api.unref(prepare);
  api.unref(check);
  return std::shared_ptr<UvPulse>(new UvPulse(std::move(control)));
}

UvPulse::~UvPulse() {
  // Handles still open (the loop thread never closed them) stay harmless: no engine to drive.
  if (!forgotten_after_fork()) set_engine(nullptr);
}

void UvPulse::set_engine(Engine* engine) {
  std::lock_guard<std::mutex> lock(control_->mutex);
  control_->engine = engine;
}

void UvPulse::forget_engine() noexcept {
  control_->forgotten.store(true, std::memory_order_relaxed);
}

bool UvPulse::forgotten_after_fork() const noexcept {
  return control_->forgotten.load(std::memory_order_relaxed);
}

void UvPulse::close() {
  if (closed_) return;
  closed_ = true;
  if (!forgotten_after_fork()) set_engine(nullptr);
  const UvApi& api = control_->api;
  api.prepare_stop(control_->prepare);
  api.check_stop(control_->check);
  api.close(control_->prepare, on_close);
  api.close(control_->check, on_close);
}

}  // namespace loopguard
