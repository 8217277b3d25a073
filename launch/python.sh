# Sourced by the scripts in launch/: sets PYTHON to the interpreter that runs megamoe.
# Order: $MEGAMOE_PYTHON if set; the repository's .venv (made by tools/bootstrap.sh) when
# present; else the first python3 / python on PATH that imports megamoe; else an error that
# says how to set the environment up. No PYTHONPATH is added: the interpreter must import
# megamoe as it is, so the commands the launchers print run the same from a fresh shell.
megamoe_find_python() {
  local root=$1 py
  if [ -n "${MEGAMOE_PYTHON:-}" ]; then
    PYTHON=$MEGAMOE_PYTHON
    return 0
  fi
  if [ -x "$root/.venv/bin/python" ]; then
    # Checked from / so that a megamoe/ folder in the working directory does not count.
    if (cd / && "$root/.venv/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('megamoe') is None)") 2>/dev/null; then
      PYTHON=$root/.venv/bin/python
      return 0
    fi
    echo "megamoe: $root/.venv exists but cannot import megamoe; finish its set-up with: bash $root/tools/bootstrap.sh" >&2
    return 1
  fi
  for py in python3 python; do
    if command -v "$py" >/dev/null 2>&1 && (cd / && "$py" -c "import megamoe, torch") >/dev/null 2>&1; then
      PYTHON=$(command -v "$py")
      return 0
    fi
  done
  echo "megamoe: no Python environment with megamoe found. Set one up with: bash $root/tools/bootstrap.sh" >&2
  echo "  (creates $root/.venv; or install megamoe into your own environment: pip install -e $root," >&2
  echo "  or point MEGAMOE_PYTHON at an interpreter that imports megamoe)" >&2
  return 1
}
