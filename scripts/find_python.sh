#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter, or fails with a message.
# Order: $PYTHON, python3.12/python3/python3.13 on PATH, then pyenv versions (3.12 first:
# the GPU machines run 3.12).
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
for c in ${PYTHON:-} python3.12 python3 python3.13; do
  p=$(command -v "$c" 2>/dev/null) || continue
  if ok "$p"; then echo "$p"; exit 0; fi
done
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
for p in $(ls -d "$root"/versions/3.12*/bin/python3 2>/dev/null | sort -rV) \
         $(ls -d "$root"/versions/3.1[3-9]*/bin/python3 2>/dev/null | sort -V); do
  if ok "$p"; then echo "$p"; exit 0; fi
done
echo "error: no Python >= 3.12 found; install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12" >&2
exit 1
