"""kogpt2-pipeline: also Beam's --setup_file for remote workers (Dataflow)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="kogpt2-pipeline",
    version="0.1.0",
    description="Korean GPT-2 batch pipeline: Beam preprocessing to TFRecord, tf.data training, Beam bulk generation to Parquet",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=[
        *find_packages(include=["kogpt2", "kogpt2.*", "pipelines", "pipelines.*"]),
        "kogpt2.data",  # the bundled corpus and seed words (data files only)
        "kogpt2.native",  # the attention kernel's C++ source, built on first use (kogpt2/native_ops.py)
        "kogpt2.schema_files",
    ],
    # schemas/ (the machine-readable specs) ships as the package data of kogpt2.schema_files
    package_dir={"kogpt2.schema_files": "schemas"},
    package_data={"kogpt2.data": ["*.txt", "*.md"], "kogpt2.native": ["*.cc"], "kogpt2.schema_files": ["*.json"]},
    include_package_data=True,
    install_requires=[
        "tensorflow==2.21.*",
        "tf-keras==2.21.*",
        "transformers>=4.57,<5",  # v5 removed the TF models
        "apache-beam==2.77.*",
        "sentencepiece>=0.2",
        "google-crc32c>=1.5",  # TFRecord CRCs without TensorFlow (preprocessing workers)
        "jsonschema>=4",  # info.json checked against schemas/shard_info.json
        "tokenizers>=0.20",
        "pyarrow>=15",
        "numpy>=1.26",
        "matplotlib>=3.8",
    ],
    extras_require={
        "dataflow": ["apache-beam[gcp]==2.77.*"],
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "mypy>=1.10",
            "jsonschema>=4",
            # gs:// in the tests: Beam's GCS IO against a local emulator (tests/gcs_emulator.py)
            "apache-beam[gcp]==2.77.*",
            "gcp-storage-emulator==2026.7.19",  # its handlers are patched by name: upgrade deliberately
        ],
    },
    entry_points={"console_scripts": ["kogpt2=kogpt2.cli:main"]},
)
