// The C++ counterpart of the web UI's DisableInitialization and InitializeOnMeta context
// managers: a thread-local init context that the layer kit (layers.h) consults whenever it
// allocates a parameter or buffer.
//
//   DisableInitialization  init routines are skipped: tensors are allocated but not filled
//                          (their values are about to be overwritten by the loader anyway).
//   InitializeOnMeta       every parameter and buffer is a meta tensor (shape and dtype only,
//                          zero bytes, zero time); implies no initialisation.
//
// Guards are RAII, nest, and restore the previous state when they go out of scope, exceptions
// included. The state is per thread: two threads building models at once do not see each
// other's mode. LibTorch-free.
#ifndef METALOAD_SERVER_CORE_INIT_CONTEXT_H_
#define METALOAD_SERVER_CORE_INIT_CONTEXT_H_

namespace metaload::core {

struct InitState {
  bool initialization_disabled = false;
  bool on_meta = false;
};

// This thread's current state.
InitState CurrentInitState();

class DisableInitialization {
 public:
  DisableInitialization();
  ~DisableInitialization();
  DisableInitialization(const DisableInitialization&) = delete;
  DisableInitialization& operator=(const DisableInitialization&) = delete;

 private:
  InitState saved_;
};

class InitializeOnMeta {
 public:
  InitializeOnMeta();
  ~InitializeOnMeta();
  InitializeOnMeta(const InitializeOnMeta&) = delete;
  InitializeOnMeta& operator=(const InitializeOnMeta&) = delete;

 private:
  InitState saved_;
};

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_INIT_CONTEXT_H_
