# Sourced by scripts/test and scripts/bench/*: make .venv hold everything tests and benchmarks need.
# Sets $py to the venv's python.
ensure_full_venv() {
  venv="${CKPTKIT_VENV:-.venv}"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  py="$venv/bin/python"
  # Reinstall only when the dependency declarations change.
  local want stamp log
  want="$(cat pyproject.toml scripts/lib/venv.sh | sha256sum | cut -c1-16)"
  stamp="$venv/.ckptkit-deps"
  [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0
  log="$(mktemp)"
  echo "installing ckptkit and its test dependencies into $venv (log: $log)" >&2
  # torch first and pinned: a range would otherwise pull the CUDA build from the index.
  if ! { "$py" -m pip install "torch==2.13.0" \
         && "$py" -m pip install -e ".[all,test]" "setuptools<81"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "dependency install failed; full log in $log" >&2
    return 1
  fi
  echo "$want" >"$stamp"
}
