from setuptools import find_packages, setup

setup(
    name="caduceus-dist",
    version="0.1.0",
    description="Distributed, fault-tolerant pretraining of Caduceus DNA language models",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["caduceus_dist", "caduceus_dist.*"]),
    package_data={"caduceus_dist": ["sample/*", "native/*.c"]},
    install_requires=[
        "torch>=2.9",  # public torch.distributed.fsdp.fully_shard (2.6), torchrun --signals-to-handle (2.9)
        "deepspeed>=0.16",
        "webdataset>=0.2.100",
        "omegaconf>=2.3",
        "pyyaml>=6",  # genome collection files
        "zstandard>=0.22",  # reads shard format versions 1 and 2
        "tensorboard>=2.16",
        "submitit>=1.5",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tqdm>=4.60",
    ],
    extras_require={
        # Needs a CUDA torch and --no-build-isolation; see the README ("GPU install").
        "cuda": ["mamba-ssm>=1.2", "causal-conv1d>=1.2"],
        # transformers' Auto classes for exported checkpoints (docs/huggingface.md); 4.46 and 5.x are tested.
        "hf": ["transformers>=4.46"],
        "dev": ["pytest>=8", "ruff>=0.5", "pyfaidx>=0.8", "transformers>=4.46"],
    },
)
