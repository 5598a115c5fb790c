# Shared by scripts/run.sh and scripts/test.sh: create $VENV (default .venv) and install the project
# with the given extras, once per pyproject.toml + extras + Python version (a stamp in the venv
# records it and the second run is instant). torch/torchvision are pinned as a pair and installed
# first: spandrel needs torchvision, and a torchvision built for another torch does not import
# (PyPI's torchvision does not import beside the 2.13 CPU wheel). The runtime (`serve`) needs no torch.
# After it returns, the venv is active.
ensure_venv() {
  local extras="$1"
  local venv="${VENV:-.venv}"
  local python="${PYTHON:-python3}"
  local torch_pins=(torch==2.14.1 torchvision==0.29.1)
  if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv ($("$python" --version 2>&1))" >&2
    "$python" -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  local stamp="$venv/.gendr-installed"
  local want
  want="$({ cat pyproject.toml; echo "${torch_pins[*]} [$extras]"; python -c 'import sys; print(sys.version)'; } \
    | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && python -c 'import engine_build, service' 2>/dev/null; then
    return 0
  fi
  echo "==> installing gendr-serve[$extras] into $venv (first run: a few minutes)" >&2
  python -m pip install -q --upgrade pip
  case ",$extras," in
    *,build,*) python -m pip install -q "${torch_pins[@]}" ;;
  esac
  python -m pip install -q -e ".[$extras]"
  echo "$want" >"$stamp"
}
