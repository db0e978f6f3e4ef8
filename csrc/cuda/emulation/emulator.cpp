// The host emulator of csrc/cuda's kernels (README.md here): blocks run one at a time; each
// CUDA thread of a block is a fiber (ucontext) that runs until it reaches a barrier or ends.
// When every fiber has stopped, the scheduler releases what a GPU would release: a warp whose
// 32 lanes all wait at a warp barrier (__syncwarp, either half of a shuffle), or the block
// once every thread waits at __syncthreads. If nothing can be released, the kernel would hang
// or is undefined on a GPU (threads at different barriers, a lane that exited before a
// shuffle, a thread that exited before __syncthreads): the launch fails and says which.
//
// Fibers run in thread order, or in reverse order (LMFAST_CUDA_EMULATION_ORDER=reverse):
// shared memory read without the barrier that should order it after another thread's write
// then reads a stale value in one of the two orders.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "emulator.h"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace lmfast_emulation {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;
constexpr size_t kDefaultSharedLimit = 48 * 1024;  // without cudaFuncSetAttribute's opt-in
constexpr int kOptInSharedLimit = 227 * 1024;      // an H100's opt-in limit

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone, kFaulted };

struct Fiber {
  ucontext_t context;
  State state = State::kReady;
  void* stack = nullptr;  // kStackBytes, above a guard page
};

std::mutex launch_mutex;  // one launch at a time: the globals below are the running block's
std::vector<Fiber> fibers;
ucontext_t scheduler;
int current = -1;
const std::function<void()>* body = nullptr;
std::vector<std::array<uint64_t, 32>> exchange;  // per warp
unsigned char* shared_memory = nullptr;
size_t shared_capacity = 0;
std::string fault;
std::map<const void*, int> shared_opt_in;  // kernel -> bytes allowed by cudaFuncSetAttribute
// __syncthreads_or of the running block: each thread's count of its calls so far, and two
// slots, call n's in slot n % 2, holding the last call whose vote was true. A thread that runs
// ahead into call n + 1 writes the other slot; call n + 2 waits at its barrier for every thread
// to have read call n's. (No slot is ever cleared: a clear could race with a vote.)
std::vector<long> vote_calls;
long vote_slots[2];

bool reverse_order() {
  const char* order = std::getenv("LMFAST_CUDA_EMULATION_ORDER");
  return order != nullptr && std::strcmp(order, "reverse") == 0;
}

void* new_stack() {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  void* base = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) throw std::runtime_error("cuda emulation: cannot map a fiber stack");
  mprotect(base, page, PROT_NONE);  // an overflow faults instead of corrupting the next stack
  return static_cast<char*>(base) + page;
}

void fiber_main() {
  (*body)();
  fibers[current].state = State::kDone;
  // returning resumes the scheduler (uc_link)
}

void wait_at(State state) {  // (a barrier, or the end of a faulting thread)
  Fiber& self = fibers[current];
  self.state = state;
  swapcontext(&self.context, &scheduler);
}

std::string thread_name(int t) {
  return "thread " + std::to_string(t) + " (warp " + std::to_string(t / 32) + ", lane " + std::to_string(t % 32) +
         ") of block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ")";
}

const char* state_name(State s) {
  switch (s) {
    case State::kAtBlockBarrier: return "waits at __syncthreads";
    case State::kAtWarpBarrier: return "waits at a warp barrier (__syncwarp or a shuffle)";
    case State::kDone: return "has exited";
    default: return "is ready";
  }
}

// Releases what can be released; false when nothing can (the fault is then recorded).
bool release(int n) {
  bool released = false;
  for (int w = 0; w < n / 32; ++w) {
    int waiting = 0, done = 0;
    for (int l = 0; l < 32; ++l) {
      const State s = fibers[w * 32 + l].state;
      waiting += s == State::kAtWarpBarrier;
      done += s == State::kDone;
    }
    if (waiting == 32) {
      for (int l = 0; l < 32; ++l) fibers[w * 32 + l].state = State::kReady;
      released = true;
    } else if (waiting > 0 && done > 0) {
      int t = w * 32;
      while (fibers[t].state != State::kDone) ++t;
      fault = "warp barrier with an exited lane: " + thread_name(t) + " has exited while others of its warp " +
              "wait at __syncwarp or a shuffle (undefined on a GPU)";
      return false;
    }
  }
  if (released) return true;
  int at_block = 0, done = 0;
  for (int t = 0; t < n; ++t) {
    at_block += fibers[t].state == State::kAtBlockBarrier;
    done += fibers[t].state == State::kDone;
  }
  if (at_block > 0 && at_block + done == n && done == 0) {
    for (int t = 0; t < n; ++t) fibers[t].state = State::kReady;
    return true;
  }
  // Stuck: describe the first two threads in different states.
  int a = 0, b = -1;
  for (int t = 1; t < n && b < 0; ++t)
    if (fibers[t].state != fibers[a].state) b = t;
  fault = "the block cannot go on (a hang or undefined behaviour on a GPU): " + thread_name(a) + " " +
          state_name(fibers[a].state);
  if (b >= 0) fault += ", " + thread_name(b) + " " + state_name(fibers[b].state);
  return false;
}

void run_block(int n, bool reverse, size_t smem_bytes) {
  for (int t = 0; t < n; ++t) {
    Fiber& f = fibers[t];
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &scheduler;
    makecontext(&f.context, fiber_main, 0);
    f.state = State::kReady;
  }
  vote_calls.assign(size_t(n), 0);
  vote_slots[0] = vote_slots[1] = -1;
  // uninitialized shared memory reads as NaN (0xff bytes: a NaN in float32, float16, bfloat16)
  if (smem_bytes) std::memset(shared_memory, 0xff, smem_bytes);
  for (;;) {
    for (int k = 0; k < n; ++k) {
      const int t = reverse ? n - 1 - k : k;
      if (fibers[t].state != State::kReady) continue;
      current = t;
      threadIdx = {unsigned(t), 0, 0};
      swapcontext(&scheduler, &fibers[t].context);
      if (!fault.empty()) return;  // (the thread reported it; the block is abandoned)
    }
    bool all_done = true;
    for (int t = 0; t < n; ++t) all_done &= fibers[t].state == State::kDone;
    if (all_done || !release(n)) return;
  }
}

}  // namespace

void block_barrier() { wait_at(State::kAtBlockBarrier); }
bool block_vote_any(bool vote) {
  const long call = vote_calls[current]++;
  long& slot = vote_slots[call % 2];
  if (vote) slot = call;
  wait_at(State::kAtBlockBarrier);
  return slot == call;
}
void warp_barrier() { wait_at(State::kAtWarpBarrier); }
uint64_t* warp_exchange() { return exchange[current / 32].data(); }
void* dynamic_shared() { return shared_memory; }

// The faulting thread stops here for good (the access it was about to make may be undefined
// behaviour on the host too), and the launch fails once the scheduler has it back.
void report_error(const char* what) {
  if (fault.empty()) fault = std::string(what) + " in " + thread_name(current);
  wait_at(State::kFaulted);
}

void require_full_warp_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) report_error((std::string(what) + ": the emulation has full-warp masks only").c_str());
}

void check_aligned(const void* p, size_t bytes, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % bytes == 0) return;
  report_error(("misaligned " + std::to_string(bytes) + "-byte access at " + file + ":" + std::to_string(line) +
                " (\"misaligned address\" on a GPU)").c_str());
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& thread_body) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  const long n = long(block.x) * block.y * block.z;
  if (block.y != 1 || block.z != 1 || n < 32 || n > kMaxThreads || n % 32 != 0)
    throw std::runtime_error("cuda emulation: blocks of whole warps along x only, up to 1024 threads; got (" +
                             std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                             std::to_string(block.z) + ")");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("cuda emulation: an empty grid");
  const auto opt_in = shared_opt_in.find(kernel);
  const size_t smem_limit = opt_in == shared_opt_in.end() ? kDefaultSharedLimit : size_t(opt_in->second);
  if (smem_bytes > smem_limit)
    throw std::runtime_error("cuda emulation: a launch with " + std::to_string(smem_bytes) +
                             " bytes of dynamic shared memory, past the kernel's limit of " +
                             std::to_string(smem_limit) + " (cudaFuncSetAttribute raises it)");
  if (smem_bytes > shared_capacity) {
    std::free(shared_memory);
    shared_memory = static_cast<unsigned char*>(std::aligned_alloc(256, (smem_bytes + 255) / 256 * 256));
    shared_capacity = smem_bytes;
  }
  while (fibers.size() < size_t(n)) {
    fibers.emplace_back();
    fibers.back().stack = new_stack();
  }
  exchange.assign(size_t(n / 32), {});
  body = &thread_body;
  blockDim = block;
  gridDim = grid;
  fault.clear();
  const bool reverse = reverse_order();
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        run_block(int(n), reverse, smem_bytes);
        if (!fault.empty()) throw std::runtime_error("cuda emulation: " + fault);
      }
}

}  // namespace lmfast_emulation

// ---- runtime API ---------------------------------------------------------------------------

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// Multiprocessors: LMFAST_CUDA_EMULATION_SMS, default 3 (few, so that the launchers' grids,
// sized from it, stride over several rows per group as they do on a big GPU with many rows).
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount) {
    const char* sms = std::getenv("LMFAST_CUDA_EMULATION_SMS");
    *value = sms ? std::max(1, std::atoi(sms)) : 3;
  } else {
    *value = lmfast_emulation::kOptInSharedLimit;
  }
  return cudaSuccess;
}

cudaError_t lmfast_emulated_func_set_attribute(const void* func, cudaFuncAttribute, int value) {
  if (value > lmfast_emulation::kOptInSharedLimit)
    throw std::runtime_error("cuda emulation: cudaFuncSetAttribute past the opt-in shared memory limit");
  const std::lock_guard<std::mutex> lock(lmfast_emulation::launch_mutex);
  lmfast_emulation::shared_opt_in[func] = value;
  return cudaSuccess;
}
