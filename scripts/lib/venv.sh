# Shared by scripts/run.sh and scripts/test.sh: create .venv and install the project once per
# pyproject.toml version (a stamp file keyed by its hash makes the second run instant).
# torch comes first and pinned: spandrel needs torchvision, and the torch/torchvision pair that
# imports together on CPU here is 2.14.1/0.29.1 (PyPI's torchvision does not import beside the
# 2.13 CPU wheel). The serving runtime itself never needs torch (extra `serve`).
ensure_venv() {
  local extras="$1"
  local venv="${GENDR_VENV:-.venv}"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  local key
  key=$( (cat pyproject.toml; echo "$extras") | sha256sum | cut -c1-16)
  local stamp="$venv/.gendr-installed-$key"
  if [ ! -f "$stamp" ]; then
    python -m pip install -q --upgrade pip
    case ",$extras," in
      *,build,*) python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" ;;
    esac
    python -m pip install -q -e ".[${extras}]"
    touch "$stamp"
  fi
}
