#include "server/core/torch_runtime.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>

namespace metaload::core {

bool CudaAvailable() { return at::hasCUDA() && at::getNumGPUs() > 0; }

void SetIntraOpThreads(int threads) {
  if (threads > 0) at::set_num_threads(threads);
}

int IntraOpThreads() { return at::get_num_threads(); }

void InitIntraOpThreadsForThisThread() { at::init_num_threads(); }

}  // namespace metaload::core
