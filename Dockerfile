# The image of the KubeRay RayJob (cluster/kuberay-rayjob.yaml): Ray's own GPU image, whose Ray and
# Python are the versions pyproject.toml pins, plus this project installed with the exact dependency
# versions its tests passed with (constraints.txt). Build and push from the repository root:
#   docker build -t my-registry/tsd-oid:0.1.0 . && docker push my-registry/tsd-oid:0.1.0
# tests/test_cluster_configs.py checks that this file, pyproject.toml, constraints.txt and the
# manifests agree (base image, Ray and Python versions, what is copied, where the configs are).
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /app

# Dependencies first, in their own layer: a code change does not reinstall torch.
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
RUN mkdir -p tsd_model data_prep pipeline cluster \
    && touch tsd_model/__init__.py data_prep/__init__.py pipeline/__init__.py cluster/__init__.py \
    && pip install --no-cache-dir -c constraints.txt . \
    && pip uninstall -y tsd-oid

COPY --chown=ray:users tsd_model tsd_model
COPY --chown=ray:users data_prep data_prep
COPY --chown=ray:users pipeline pipeline
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users configs configs
RUN pip install --no-cache-dir --no-deps -c constraints.txt . && tsd --version

# No ENTRYPOINT: KubeRay starts Ray in the container itself (ray start), and the RayJob's
# entrypoint runs `python -m pipeline.cli train --config /app/configs/...` on the head.
