// The `metaload` subcommands that live outside main.cc. Each takes the arguments after its
// name and returns the process exit code: 0 ok, 1 failed, 2 usage error (inspect: invalid file).
#ifndef METALOAD_CLIENT_COMMANDS_H_
#define METALOAD_CLIENT_COMMANDS_H_

#include <string>
#include <vector>

namespace metaload::client {

// metaload inspect PATH [--json] [--tensors]: offline validation and summary of a checkpoint.
int RunInspect(const std::vector<std::string>& argv);

// The daemon's RPCs (rpc_commands.cc). Exit 1 with the gRPC code name on an RPC error.
int RunLoad(const std::vector<std::string>& argv);
int RunUnload(const std::vector<std::string>& argv);
int RunGet(const std::vector<std::string>& argv);
int RunList(const std::vector<std::string>& argv);
int RunInfer(const std::vector<std::string>& argv);
// metaload bench infer|load-hit|switch: a bounded load tester (bench_command.cc).
int RunBench(const std::vector<std::string>& argv);

}  // namespace metaload::client

#endif  // METALOAD_CLIENT_COMMANDS_H_
