# Sourced on the lent GPU machine (torch 2.11 + transformers 5.17 image, no Ray, no pydantic):
# installs the carried wheels (.whl/, never committed; scripts/gpu/fetch-wheels.sh fills it) and puts the
# repo on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/operator:$PWD/analysis PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
export PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'ray', ray.__version__)"
