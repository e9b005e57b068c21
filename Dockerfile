# bdmtool in one image: the same pinned environment as ./run (requirements/lock.txt), plus Debian's adb client.
# Build:  docker build -t bdmtool .
# Use:    docker run --rm -v "$PWD:/work" -w /work bdmtool demo
#         docker run --rm --network host -v "$PWD:/work" -w /work bdmtool bench --device adb:SERIAL model.tflite
# (Not built in this project's CI: its machines have no Docker engine. Keep it in step with pyproject.toml.)
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends adb \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/bdmtool
COPY requirements/lock.txt requirements/lock.txt
# --no-deps: exactly the verified versions (numpy 1.26.4, tensorflow-cpu 2.19.0, ...); the CPU index provides
# torch 2.13.0+cpu (PyPI's torch wheel is the CUDA build).
RUN pip install --no-cache-dir --no-deps --extra-index-url https://download.pytorch.org/whl/cpu \
        -r requirements/lock.txt

COPY pyproject.toml README.md ./
COPY bdmtool bdmtool
COPY trainer trainer
COPY exporter exporter
COPY android_bench android_bench
COPY tools tools
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
 && python -c "import bdmtool, torch, numpy; assert numpy.__version__ == '1.26.4'"

ENV TF_USE_LEGACY_KERAS=1
ENTRYPOINT ["bdmtool"]
CMD ["--help"]
