# syntax=docker/dockerfile:1
# prompter, encoder or decoder with onnxruntime's CUDA execution provider, for NVIDIA GPUs.
# Build from the repository root (the build context), once per stage:
#   docker build -f deploy/docker/gpu.Dockerfile --build-arg SERVICE=decoder -t cfrsam/decoder-gpu:0.1.0 .
# The pods select the provider with CFRSAM_EXECUTION_PROVIDERS=cuda,cpu (deploy/k8s/overlays/gpu).
# Needs an NVIDIA driver supporting CUDA 12 on the node (>= 525) and the NVIDIA container runtime.
ARG NODE_VERSION=20
ARG SERVICE=decoder
# onnxruntime-node 1.30's CUDA provider is built for CUDA 12 and cuDNN 9.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

FROM node:${NODE_VERSION}-bookworm AS deps
WORKDIR /src
COPY package.json package-lock.json .npmrc ./
COPY packages/rpc/package.json packages/rpc/
COPY packages/contract/package.json packages/contract/
COPY packages/runtime/package.json packages/runtime/
COPY packages/nuclei/package.json packages/nuclei/
COPY packages/testing/package.json packages/testing/
COPY packages/slides/package.json packages/slides/
COPY services/prompter/package.json services/prompter/
COPY services/encoder/package.json services/encoder/
COPY services/decoder/package.json services/decoder/
COPY services/gateway/package.json services/gateway/
COPY services/standalone/package.json services/standalone/
RUN npm ci --omit=dev --no-audit --no-fund
# The CUDA provider libraries (libonnxruntime_providers_cuda.so, _shared.so, _tensorrt.so) are too
# large for the npm package; onnxruntime-node's install script fetches them from NuGet
# (Microsoft.ML.OnnxRuntime.Gpu.Linux, same version) into its bin/ folder. .npmrc skips that
# script for CPU installs; ONNXRUNTIME_NODE_INSTALL takes precedence over the .npmrc setting.
RUN cd node_modules/onnxruntime-node \
 && ONNXRUNTIME_NODE_INSTALL=cuda12 node script/install.js \
 && test -f bin/napi-v6/linux/x64/libonnxruntime_providers_cuda.so \
 && cd bin/napi-v6 \
 && for d in */*; do [ "$d" = "linux/x64" ] || rm -rf "$d"; done \
 && find . -type d -empty -delete

FROM node:${NODE_VERSION}-bookworm AS build
ARG SERVICE
WORKDIR /src
COPY package.json package-lock.json .npmrc ./
COPY packages/rpc/package.json packages/rpc/
COPY packages/contract/package.json packages/contract/
COPY packages/runtime/package.json packages/runtime/
COPY packages/nuclei/package.json packages/nuclei/
COPY packages/testing/package.json packages/testing/
COPY packages/slides/package.json packages/slides/
COPY services/prompter/package.json services/prompter/
COPY services/encoder/package.json services/encoder/
COPY services/decoder/package.json services/decoder/
COPY services/gateway/package.json services/gateway/
COPY services/standalone/package.json services/standalone/
RUN npm ci --no-audit --no-fund
COPY tsconfig.base.json ./
COPY protos protos
COPY packages/rpc packages/rpc
COPY packages/contract packages/contract
COPY packages/runtime packages/runtime
COPY services/${SERVICE} services/${SERVICE}
RUN case "${SERVICE}" in prompter|encoder|decoder) ;; *) echo "SERVICE must be prompter, encoder or decoder" >&2; exit 1;; esac \
 && npm run generate -w @cfrsam/rpc && npx tsc -b "services/${SERVICE}"

FROM node:${NODE_VERSION}-bookworm-slim AS node

# CUDA runtime, cuBLAS, cuFFT, cuRAND and cuDNN 9 come with the base image.
FROM ${CUDA_IMAGE}
ARG SERVICE
ENV NODE_ENV=production
# The Node.js binary from the official image (glibc build; Ubuntu 22.04's glibc is newer).
COPY --from=node /usr/local/bin/node /usr/local/bin/node
RUN useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin node
WORKDIR /app
COPY --from=deps /src ./
COPY --from=build /src/protos protos
COPY --from=build /src/packages/rpc/dist packages/rpc/dist
COPY --from=build /src/packages/contract/dist packages/contract/dist
COPY --from=build /src/packages/runtime/dist packages/runtime/dist
COPY --from=build /src/services/${SERVICE}/dist services/${SERVICE}/dist
# One entry point whatever the stage (Node resolves the link, so __dirname is the service's dist/).
RUN ln -s "services/${SERVICE}/dist/main.js" main.js
USER node
EXPOSE 50052 50053 50054 9464
ENTRYPOINT ["node", "--initial-old-space-size=128", "/app/main.js"]
