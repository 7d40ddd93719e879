// LibTorch's process-wide settings, behind declarations free of LibTorch types, so that the
// daemon's gRPC translation unit configures LibTorch without including a c10 header.
// Implemented in torch_runtime.cc (a LibTorch translation unit).
#ifndef METALOAD_SERVER_CORE_TORCH_RUNTIME_H_
#define METALOAD_SERVER_CORE_TORCH_RUNTIME_H_

namespace metaload::core {

// Whether this LibTorch was built with CUDA and sees at least one device.
bool CudaAvailable();

// Threads one forward pass may use (LibTorch's intra-op pool); <= 0 keeps LibTorch's default.
void SetIntraOpThreads(int threads);
int IntraOpThreads();
// Applies that setting to the calling thread, which LibTorch does only for its own threads: a
// thread of ours that runs a forward pass would otherwise give OpenMP (and the BLAS built on it)
// every core, however many such threads run at once.
void InitIntraOpThreadsForThisThread();

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_TORCH_RUNTIME_H_
