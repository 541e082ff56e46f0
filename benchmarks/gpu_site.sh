#!/usr/bin/env bash
# Builds .gpu/site.tar.xz: the packages a search needs that the lent GPU machine's image lacks (it has
# torch, timm, pandas, pyarrow, typer, rich, ...; not Ray, Optuna or pydantic), unpacked from their
# CPython 3.12 x86-64 wheels and packed small enough to travel with the tree (64 MiB a call). Ray's
# Java jar, RLlib, Serve and LLM are left out (a search uses none of them); MLflow is left out (the GPU
# checks search with --no-mlflow). benchmarks/gpu_session.sh unpacks it when `import ray` fails there.
#
#   bash benchmarks/gpu_site.sh       # needs a package index; about 2 minutes
set -euo pipefail
WHEELS=$(mktemp -d)
SITE=$(mktemp -d)
trap 'rm -rf "$WHEELS" "$SITE"' EXIT
python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$WHEELS" "ray[default,tune,train]==2.60.0" "optuna==5.*" "pydantic>=2"
# Everything downloaded but what the image has already (KINDS.md's package list for nvidia-h200) and
# what a search never imports (py-spy and virtualenv serve Ray's profiling and runtime environments).
SKIP=" aiohappyeyeballs aiohttp aiosignal attrs certifi charset_normalizer click filelock frozenlist fsspec
  grpcio idna markupsafe msgpack multidict numpy packaging pandas prometheus_client propcache protobuf pyarrow
  python_dateutil pyyaml requests six tqdm typing_extensions urllib3 wrapt yarl
  py_spy virtualenv distlib platformdirs python_discovery "
for wheel in "$WHEELS"/*.whl; do
  name=$(basename "$wheel" | sed 's/-[0-9].*//' | tr 'A-Z' 'a-z')
  case " $(echo $SKIP) " in *" $name "*) continue ;; esac
  unzip -q -o "$wheel" -d "$SITE"
done
rm -rf "$SITE"/ray/jars "$SITE"/ray/rllib "$SITE"/ray/serve "$SITE"/ray/llm
mkdir -p .gpu
tar cJf .gpu/site.tar.xz --exclude=__pycache__ -C "$SITE" .
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
ls -la .gpu/site.tar.xz
