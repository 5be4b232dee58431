#!/bin/sh
# The image's build and install steps, in one place (the Dockerfile runs them).
#
#   wheels.sh deps LOCKFILE OUTDIR    wheels of the runtime dependencies pinned in
#                                     requirements.lock, every file checked against its
#                                     hash (no source needed: cacheable)
#   wheels.sh app SRCDIR OUTDIR       the shardworker wheel itself, without dependencies
#   wheels.sh install DEPSDIR VENV    a fresh venv with only the dependencies, offline,
#                                     hashes required again
#   wheels.sh install DEPSDIR VENV APPDIR
#                                     shardworker into that venv, offline; pip resolves
#                                     it against DEPSDIR, so a dependency missing from
#                                     the wheels fails here, not at run time
#
# PYTHON selects the interpreter (default python3).
set -eu
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

usage() {
    echo "usage: wheels.sh deps PYPROJECT OUTDIR | app SRCDIR OUTDIR | install DEPSDIR VENV [APPDIR]" >&2
    exit 2
}

[ $# -ge 3 ] || usage
command=$1
case "$command" in
deps)
    mkdir -p "$3"
    cp "$2" "$3/requirements.txt"
    # --only-binary: a wheel built here from an sdist would not match the lock's hashes.
    "$PYTHON" -m pip wheel --quiet --require-hashes --only-binary :all: --wheel-dir "$3" \
        --requirement "$3/requirements.txt"
    ;;
app)
    mkdir -p "$3"
    # An absolute path: a bare "src" would be read as a project name on the index.
    "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$3" "$(cd "$2" && pwd)"
    ;;
install)
    if [ $# -eq 3 ]; then
        "$PYTHON" -m venv "$3"
        "$3/bin/python" -m pip install --quiet --no-index --require-hashes --find-links "$2" \
            --requirement "$2/requirements.txt"
    else
        "$3/bin/python" -m pip install --quiet --no-index --find-links "$2" \
            --find-links "$4" shardworker
    fi
    ;;
*)
    usage
    ;;
esac
