"""gpt: GPT-2 in JAX/Flax for fine-tuning, pretraining, sampling and few-shot evaluation."""
from setuptools import find_packages, setup

setup(
    name="gpt",
    version="0.1.0",
    description="GPT-2 in JAX/Flax: fine-tune, pretrain, sample and evaluate (0/1/few-shot)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gpt", "gpt.*"]),
    package_data={"gpt": ["assets/gpt2/encoder.json", "assets/gpt2/vocab.bpe",
                          "kernels/*.cc", "kernels/*.h"]},  # kernels build at first use
    install_requires=[
        "jax[cpu]>=0.4.35",
        "flax>=0.11",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.11",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "tiktoken>=0.7",
        "numpy>=1.26",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "crc32c>=2.4",
    ],
    extras_require={
        # pytest-xdist: pytest.ini runs the tests on one worker per core; filelock: the workers share
        # jax's persistent compilation cache (tests/conftest.py), whose size bound needs it.
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-xdist>=3.5", "filelock>=3.12"],
        # Reference checks against PyTorch/transformers and lm-evaluation-harness (torch 2.13 CPU wheel here).
        "hf": ["torch>=2.3", "transformers>=4.44", "lm-eval>=0.4.3", "accelerate>=0.26"],
        # python -m gpt.harness: lm-evaluation-harness with this package's model (no torch needed).
        "harness": ["lm-eval>=0.4.13"],
        # tests/test_lora.py loads our exported LoRA adapters with Hugging Face PEFT.
        "peft": ["peft>=0.10"],
        "tfds": ["tensorflow-datasets>=4.9", "array-record>=0.5"],
        "gpu": ["jax[cuda12]>=0.4.35"],
        # Compile mode for TPU slices on any machine (gpt.compile): libtpu from PyPI, no TPU needed.
        "tpu": ["jax[tpu]>=0.4.35"],
        "plots": ["matplotlib>=3.8"],
        # experiments/bench_decode.py's CTranslate2 columns (the CPU decoding engine to beat).
        "bench": ["ctranslate2>=4.0"],
        # experiments/sweep.py --engine=ray (a local ray.init() cluster or a real one).
        "sweep": ["ray>=2.9"],
        # Training's float32 matmuls on CPU through Intel MKL's sgemm (gpt.kernels.gemm; libmkl_rt, found at run time).
        "mkl": ["mkl>=2024.0"],
    },
    entry_points={"console_scripts": ["gpt=gpt.main:run"]},
)
