# Sourced by scripts/test and scripts/demo: find Python 3.12+, build .venv, install the project.
# shellcheck shell=bash

find_python() {
    local candidate version
    for candidate in python3.13 python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; raise SystemExit(sys.version_info < (3, 12))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    # pyenv keeps interpreters that its shims only expose once selected.
    if command -v pyenv >/dev/null 2>&1; then
        for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.[0-9]+)?$' | sort -rV); do
            candidate="$(pyenv root)/versions/$version/bin/python3"
            if [ -x "$candidate" ]; then
                echo "$candidate"
                return 0
            fi
        done
    fi
    return 1
}

ensure_venv() {
    local python
    if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; raise SystemExit(sys.version_info < (3, 12))' 2>/dev/null; then
        python=$(find_python) || {
            echo "error: django_tasks needs Python 3.12 or later; none found (tried python3.13, python3.12, python3 and pyenv's versions)." >&2
            exit 1
        }
        echo "Creating .venv with $python ($("$python" --version 2>&1))" >&2
        rm -rf .venv
        "$python" -m venv .venv
        .venv/bin/python -m pip install --quiet --upgrade pip
    fi
    .venv/bin/python -m pip install --quiet -r requirements.txt -e .
}
