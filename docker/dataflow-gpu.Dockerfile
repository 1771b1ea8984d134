# Worker image for Dataflow GPU workers (and any Beam runner that takes a container image).
#
#   docker build -f docker/dataflow-gpu.Dockerfile -t REGION-docker.pkg.dev/PROJECT/REPO/kogpt2-gpu:0.1.0 .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/kogpt2-gpu:0.1.0
#
# The Beam SDK image brings the worker boot program and Python 3.11; TensorFlow's
# `and-cuda` extra brings the CUDA and cuDNN libraries as wheels; Dataflow installs the
# NVIDIA driver itself (`install-nvidia-driver` in --dataflow_service_options).
# The launcher must run the same Beam (2.77) and Python (3.11) as this image.
FROM apache/beam_python3.11_sdk:2.77.0

ENV TF_USE_LEGACY_KERAS=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TF_FORCE_GPU_ALLOW_GROWTH=true \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/kogpt2
RUN pip install "tensorflow[and-cuda]==2.21.*" "tf-keras==2.21.*"
COPY setup.py pyproject.toml MANIFEST.in README.md ./
COPY kogpt2 kogpt2
COPY pipelines pipelines
COPY schemas schemas
RUN pip install ".[dataflow]" && python -c "import kogpt2, pipelines.generate"

ENTRYPOINT ["/opt/apache/beam/boot"]
