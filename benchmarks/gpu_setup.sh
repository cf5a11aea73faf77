# Sourced by gpu_check.sh on a GPU machine without network: unbuffered
# Python output, wheels carried under .whl/ (e.g. gguf) installed to /tmp/site, and this tree
# installed without dependencies or build isolation (the machine's image has torch,
# transformers and typer) unless it already is.
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
$PY -c "import gpconv_cli" 2>/dev/null \
  || $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . > /tmp/install.log 2>&1 \
  || { cat /tmp/install.log; exit 1; }
