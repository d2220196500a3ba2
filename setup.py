"""ckf_dist: CKF multi-task LLM recommenders trained at cluster scale with Ray + DeepSpeed.

Install (CPU machine): pip install torch==2.13.0 -e '.[test]'
The Triton kernels live in the top-level ``kernels/`` folder and are installed as ``ckf_dist.kernels``
(never as a top-level ``kernels`` module: that name belongs to a PyPI package transformers probes for). Run from
a source tree (the repo folder as working directory, ``ray job submit --working-dir .``, the Docker image), the
package resolves ``ckf_dist.kernels`` to that tree's ``kernels/`` itself (``ckf_dist/__init__.py``).
"""
from setuptools import find_packages, setup

RUNTIME = [
    "torch>=2.4",
    "deepspeed>=0.16",
    "ray[default,train,data]>=2.50",  # default: the dashboard + job server behind `ray job submit`
    "transformers>=4.50",
    "tokenizers>=0.20",
    "triton>=3.0; platform_system == 'Linux'",
    "pyarrow>=17",
    "s3fs>=2024.6",
    "omegaconf>=2.3",
    "safetensors>=0.4",
    "scikit-learn>=1.4",
    "numpy>=1.26",
    # ckf_dist.evaluate: explanation metrics and the comparison chart
    "sacrebleu>=2.4",
    "rouge-score>=0.1.2",
    "matplotlib>=3.8",
    # ckf_dist.metrics_log: TensorBoard event files through torch.utils.tensorboard, and the `tensorboard` viewer
    "tensorboard>=2.16",
]

setup(
    name="ckf_dist",
    version="0.1.0",
    description="CKF (collaborative knowledge fusion) multi-task LLM recommenders on Ray Train + DeepSpeed ZeRO-3",
    python_requires=">=3.10",
    packages=find_packages(include=["ckf_dist", "ckf_dist.*"]) + ["ckf_dist.kernels"],
    package_dir={"ckf_dist.kernels": "kernels"},
    install_requires=RUNTIME,
    extras_require={
        # kubernetes-validate + jsonschema: tests/test_cluster_manifests.py (offline schemas of the core kinds, CRDs)
        # peft: tests/test_bench_vs_peft.py runs benchmarks/bench_vs_peft.py at a tiny shape
        "test": ["pytest>=8", "pytest-timeout>=2.3", "moto[server]>=5.0", "kubernetes-validate>=1.30",
                 "jsonschema>=4.18", "peft>=0.17"],
        # benchmarks/bench_vs_peft.py: the HF transformers + peft baseline of the CKF training step
        "bench": ["peft>=0.17"],
        # flash-attn has no wheel on PyPI: it builds from source against CUDA (about an hour); GPU images only.
        "gpu": ["flash-attn>=2.6"],
        # SmolLM2-135M as a GGUF file (issue 5 quality runs); transformers needs gguf + accelerate to load it.
        "gguf": ["gguf>=0.10", "accelerate>=1.0"],
        # Opt-in mutation testing (setup.cfg [mutmut], README "Tests"); pinned: mutmut's config format changes.
        "mutation": ["mutmut==3.8.1"],
    },
    entry_points={"console_scripts": ["ckf-train=ckf_dist.train:main", "ckf-prepare=ckf_dist.data.prepare:main",
                                        "ckf-cf-refresh=ckf_dist.cf_refresh:main", "ckf-evaluate=ckf_dist.evaluate:main",
                                        "ckf-profile=ckf_dist.profile:main"]},
)
