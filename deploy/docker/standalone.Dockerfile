# syntax=docker/dockerfile:1
# cfrsam-standalone on CPU: the gateway's API with the prompter, encoder and decoder in one process,
# for a single machine (docker run -p 50051:50051 -v BUNDLE:/models/tiny ...). Build from the
# repository root (the build context):
#   docker build -f deploy/docker/standalone.Dockerfile -t cfrsam/standalone:0.1.0 .
# The model bundle is not in this image (models and code are released separately): mount one and
# point CFRSAM_BUNDLE at it, or copy it from the model-bundle image.
ARG NODE_VERSION=20

# Production dependencies of the workspaces. The repository's .npmrc skips onnxruntime-node's
# install script, which would download CUDA libraries; the CPU provider ships inside the package.
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
# onnxruntime-node carries binaries for every platform (~290 MB); keep this platform's only.
RUN cd node_modules/onnxruntime-node/bin/napi-v6 \
 && keep="linux/$(node -p process.arch)" \
 && for d in */*; do [ "$d" = "$keep" ] || rm -rf "$d"; done \
 && find . -type d -empty -delete

# Build: protos -> TypeScript (buf + ts-proto), then tsc for the shared packages and this service.
FROM node:${NODE_VERSION}-bookworm AS build
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
COPY packages/nuclei packages/nuclei
COPY packages/slides packages/slides
COPY services services
RUN npm run generate -w @cfrsam/rpc && npx tsc -b services/standalone

FROM node:${NODE_VERSION}-bookworm-slim
ENV NODE_ENV=production
WORKDIR /app
# The dependency tree with the workspace links (node_modules/@cfrsam/* -> packages/, services/).
COPY --from=deps /src ./
# protos/ next to package.json marks the application root, where the services look for protos
# (gRPC server reflection).
COPY --from=build /src/protos protos
COPY --from=build /src/packages/rpc/dist packages/rpc/dist
COPY --from=build /src/packages/contract/dist packages/contract/dist
COPY --from=build /src/packages/runtime/dist packages/runtime/dist
COPY --from=build /src/packages/nuclei/dist packages/nuclei/dist
COPY --from=build /src/packages/slides/dist packages/slides/dist
COPY --from=build /src/services/prompter/dist services/prompter/dist
COPY --from=build /src/services/encoder/dist services/encoder/dist
COPY --from=build /src/services/decoder/dist services/decoder/dist
COPY --from=build /src/services/gateway/dist services/gateway/dist
COPY --from=build /src/services/standalone/dist services/standalone/dist
USER node
EXPOSE 50051 9464
ENTRYPOINT ["node", "--initial-old-space-size=128", "services/standalone/dist/main.js"]
