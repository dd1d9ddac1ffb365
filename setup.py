"""Build script for ssg-engine.

The Triton kernels in ``kernels/`` are installed as ``ssg_engine.kernels``.
The C++ KV-cache extension in ``csrc/`` is built with ninja through
``torch.utils.cpp_extension`` when torch is importable at build time (use
``pip install --no-build-isolation``); a failed build does not fail the install
(``optional=True``). The sources are also installed as ``ssg_engine/csrc`` so that
an install without the compiled extension builds it at first use
(``ssg_engine/extension.py``); ``SSG_ENGINE_BUILD_EXT=0`` skips both and the
pure-Python fallback is used.
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
if os.environ.get("SSG_ENGINE_BUILD_EXT", "1") != "0":
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        print("ssg-engine: torch not importable at build time; skipping the C++ KV-cache extension")
    else:
        sources = sorted(glob.glob("csrc/*.cpp"))
        if sources:
            ext_modules.append(
                cpp_extension.CppExtension(
                    "ssg_engine._C", sources, extra_compile_args={"cxx": ["-O3"]}, optional=True
                )
            )
            cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(use_ninja=True)

setup(
    name="ssg-engine",
    version="0.1.0",
    description="Kernel-optimized inference engine for multi-scale visual autoregressive (VAR) models with Scaled Spatial Guidance",
    python_requires=">=3.9",
    # every package under ssg_engine/ (the family folders included), plus the kernels and C++ sources mapped into it
    packages=sorted({*find_packages(include=["ssg_engine", "ssg_engine.*"]), "ssg_engine.kernels", "ssg_engine.csrc"}),
    package_dir={"ssg_engine": "ssg_engine", "ssg_engine.kernels": "kernels", "ssg_engine.csrc": "csrc"},
    package_data={"ssg_engine": ["assets/**/*"], "ssg_engine.eval": ["assets/*"], "ssg_engine.csrc": ["*.cpp"]},
    include_package_data=True,
    install_requires=["torch>=2.1,<3", "numpy", "safetensors", "pillow", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "plot": ["matplotlib"],
        "text": ["transformers>=4.56", "sentencepiece"],  # ssg_engine.text (Flan-T5 features for Infinity)
        "diffusers": ["diffusers==0.42.1"],  # ssg_engine.diffusers_pipeline (the Pipeline as a DiffusionPipeline)
        "serve": ["fastapi>=0.110,<1", "uvicorn>=0.29,<1"],  # ssg-engine serve (tested with fastapi 0.165.0, uvicorn 0.55.0)
        # ssg_engine.serve.ray_deployment (Ray Serve; brings FastAPI and uvicorn too): the version its tests passed with
        "ray": ["ray[serve]==2.60.0"],
        "dev": ["pytest", "pytest-benchmark", "ninja", "pybind11", "matplotlib", "scipy"],
    },
    entry_points={"console_scripts": ["ssg-engine=ssg_engine.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
