// Command-line arguments of one `metaload` subcommand: `--name=value`, `--name value`, boolean
// `--name`, and positionals. Each command declares what it accepts; anything else is a usage
// error (exit code 2) naming the argument.
#ifndef METALOAD_CLIENT_ARGS_H_
#define METALOAD_CLIENT_ARGS_H_

#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace metaload::client {

class Args {
 public:
  // `value_flags` take a value; `bool_flags` do not. Flags may appear anywhere.
  static absl::StatusOr<Args> Parse(const std::vector<std::string>& argv,
                                    const std::set<std::string>& value_flags,
                                    const std::set<std::string>& bool_flags);

  bool Has(const std::string& flag) const { return values_.count(flag) > 0; }
  std::string Get(const std::string& flag, const std::string& fallback = "") const;
  // INVALID_ARGUMENT naming the flag when the value is not an integer.
  absl::StatusOr<long long> GetInt(const std::string& flag, long long fallback) const;
  const std::vector<std::string>& positionals() const { return positionals_; }

 private:
  std::map<std::string, std::string> values_;
  std::vector<std::string> positionals_;
};

}  // namespace metaload::client

#endif  // METALOAD_CLIENT_ARGS_H_
