# syntax=docker/dockerfile:1
# A model bundle as an image: the ONNX graphs and manifest.json under /bundle. The service pods run
# it as an initContainer that copies /bundle into an emptyDir (deploy/k8s), so a model is released,
# cached by nodes and rolled back like any image, independently of the service code.
# Build from the repository root:
#   docker build -f deploy/docker/model-bundle.Dockerfile --build-arg BUNDLE=models/tiny -t cfrsam/model-bundle:tiny-0.1.0 .
# Tag it with the bundle's manifest version so pods name exactly the model they serve.
FROM busybox:1.36
ARG BUNDLE=models/tiny
COPY ${BUNDLE}/manifest.json ${BUNDLE}/*.onnx /bundle/
# Read-only for everyone; the initContainer runs as an unprivileged user.
RUN chmod -R a+rX /bundle
USER 1000:1000
