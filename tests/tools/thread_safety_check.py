#!/usr/bin/env python3
"""Checks clang's thread-safety analysis over every translation unit that implements a class
guarded by core::Mutex.

Usage: thread_safety_check.py BUILD_DIR [CLANG]

The annotations (ABSL_GUARDED_BY, ABSL_EXCLUSIVE_LOCKS_REQUIRED, see server/core/mutex.h) only
mean something to clang; the product builds with GCC. So this runs clang in syntax-only mode,
with -Werror=thread-safety, on the compile commands of BUILD_DIR (CMake's
compile_commands.json). Which files: every server/ and client/ source that includes
server/core/mutex.h itself, and, for each header that does (dir/name.h), the sources that
implement it by the project's naming (dir/name.cc, dir/name_PART.cc). Guarded members are
private, so only the class's own code (its header's inline functions, compiled with those
sources, and those sources) can touch them: checking the hundreds of files that merely include
such a header would only re-check the same code, at clang's cost of parsing LibTorch each time.
GCC's precompiled-header flags are dropped (clang cannot read GCC's .gch). Runs the files in
parallel, one per core; exits 1 naming each file that fails.
"""

import concurrent.futures
import json
import os
import shlex
import subprocess
import sys

MUTEX_HEADER = "server/core/mutex.h"


DIRECT = '#include "%s"' % MUTEX_HEADER


def includes_mutex(path):
    with open(path, encoding="utf-8") as f:
        return DIRECT in f.read()


def users(source_dir):
    """The sources to check (see the top of this file), as real paths."""
    sources, stems = set(), []
    for layer in ("server", "client"):
        for root, _, files in os.walk(os.path.join(source_dir, layer)):
            for name in files:
                path = os.path.join(root, name)
                if not includes_mutex(path):
                    continue
                if name.endswith(".cc"):
                    sources.add(os.path.realpath(path))
                elif name.endswith(".h"):
                    stems.append((root, name[:-2]))
    for root, stem in stems:
        for name in os.listdir(root):
            if name.endswith(".cc") and (name == stem + ".cc" or name.startswith(stem + "_")):
                sources.add(os.path.realpath(os.path.join(root, name)))
    return sorted(sources)


def clang_command(entry, clang):
    args = entry.get("arguments") or shlex.split(entry["command"])
    out = [clang]
    skip = False
    for a in args[1:]:
        if skip:
            skip = False
            continue
        if a in ("-o", "-MF", "-MT", "-MQ"):
            skip = True
            continue
        if a == "-include":
            skip = True  # the precompiled header's -include (GCC's .gch)
            continue
        if a.startswith("-Winvalid-pch") or a in ("-c", "-MD", "-MMD"):
            continue
        if a.startswith("-fsanitize") or a.startswith("-fno-sanitize"):
            continue
        out.append(a)
    return out + ["-fsyntax-only", "-Wno-unknown-warning-option", "-Wthread-safety",
                  "-Werror=thread-safety"]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    build_dir = sys.argv[1]
    clang = sys.argv[2] if len(sys.argv) > 2 else "clang++"
    source_dir = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", ".."))
    with open(os.path.join(build_dir, "compile_commands.json"), encoding="utf-8") as f:
        db = {}
        for e in json.load(f):
            db.setdefault(os.path.realpath(os.path.join(e["directory"], e["file"])), e)
    sources = users(source_dir)
    missing = [s for s in sources if s not in db]
    if missing:
        sys.exit("thread-safety: not in %s/compile_commands.json: %s" % (build_dir, missing))

    def check(src):
        e = db[src]
        r = subprocess.run(clang_command(e, clang), cwd=e["directory"], capture_output=True,
                           text=True)
        return src, r.returncode, r.stderr

    failed = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for src, rc, err in pool.map(check, sources):
            rel = os.path.relpath(src, source_dir)
            if rc != 0:
                failed.append(rel)
                sys.stderr.write("thread-safety: %s\n%s\n" % (rel, err))
    print("thread-safety: %d files checked, %d failed%s" % (
        len(sources), len(failed), (": " + ", ".join(failed)) if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
