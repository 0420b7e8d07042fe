# syntax=docker/dockerfile:1
# cfrsam-gateway: the public Segmentation API (CPU only; it runs no model). Build from the
# repository root (the build context):
#   docker build -f deploy/docker/gateway.Dockerfile -t cfrsam/gateway:0.1.0 .
# The model bundle is not in this image: it comes from the model-bundle image through an
# initContainer (deploy/k8s), so models and code are released separately.
ARG NODE_VERSION=20

# Production dependencies of the gateway's workspace closure (rpc, contract, nuclei, slides).
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
# Only the gateway workspace and the packages it uses: no onnxruntime-node (the gateway runs no model).
RUN npm ci --omit=dev --no-audit --no-fund -w @cfrsam/gateway

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
COPY packages/nuclei packages/nuclei
COPY packages/slides packages/slides
COPY services/gateway services/gateway
RUN npm run generate -w @cfrsam/rpc && npx tsc -b services/gateway

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
COPY --from=build /src/packages/nuclei/dist packages/nuclei/dist
COPY --from=build /src/packages/slides/dist packages/slides/dist
COPY --from=build /src/services/gateway/dist services/gateway/dist
USER node
EXPOSE 50051 9464
ENTRYPOINT ["node", "--initial-old-space-size=128", "services/gateway/dist/main.js"]
