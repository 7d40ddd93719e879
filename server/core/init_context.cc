#include "server/core/init_context.h"

namespace metaload::core {
namespace {

thread_local InitState t_state;

}  // namespace

InitState CurrentInitState() { return t_state; }

DisableInitialization::DisableInitialization() : saved_(t_state) {
  t_state.initialization_disabled = true;
}
DisableInitialization::~DisableInitialization() { t_state = saved_; }

InitializeOnMeta::InitializeOnMeta() : saved_(t_state) {
  t_state.on_meta = true;
  t_state.initialization_disabled = true;
}
InitializeOnMeta::~InitializeOnMeta() { t_state = saved_; }

}  // namespace metaload::core
