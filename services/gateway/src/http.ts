// HTTP/JSON beside gRPC: the same Segmentation methods for curl, browsers, QuPath scripts and
// anything else without gRPC stubs. Messages use the protobuf JSON mapping (camelCase fields,
// bytes as base64, enums by name), so a request is the gRPC request written as JSON:
//
//   echo "{\"image\": \"$(base64 -w0 tile.png)\", \"mpp\": 0.5}" > request.json
//   curl -s localhost:8080/v1/segment -H 'content-type: application/json' -d @request.json
//
// Routes: POST /v1/segment, POST /v1/segment/geojson (QuPath GeoJSON of the same request, in the
// slide's coordinates: what clients/qupath's script calls), POST /v1/refine, GET /v1/model,
// GET /healthz. Errors answer with the
// HTTP status that matches the gRPC code and a JSON body {code, status, message, details}
// (RESOURCE_EXHAUSTED is 429 with Retry-After). An optional `x-timeout-ms` header is the request's
// deadline; a client that disconnects cancels its request. An optional `x-image-size: WxH` (and
// `x-image-mpp`) announces the image so the request is priced before its body is read, as on the
// gRPC port (admission/door.ts). CORS for browser viewers.
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import type { AddressInfo } from 'node:net';
import { context, INVALID_SPAN_CONTEXT, propagation, ROOT_CONTEXT, SpanKind, SpanStatusCode, trace } from '@opentelemetry/api';
import {
  type CallAuthenticator,
  errorDetailsOf,
  getTracer,
  listFlag,
  logger,
  logRequest,
  segmentationProto,
  type ServerTlsOptions,
  status,
  toServiceError,
} from '@cfrsam/rpc';
import { parseQuPathClassMap, segmentResponseToGeoJson } from '@cfrsam/nuclei';
import type { AdmissionReservation } from './admission/admission';
import { announcedSize } from './admission/announce';
import type { SegmentationPipeline } from './pipeline';

export interface HttpGatewayOptions {
  port: number;
  host?: string;
  /** Largest request body in bytes. */
  maxBodyBytes: number;
  /** Access-Control-Allow-Origin: "*" or a comma-separated list of origins ("" turns CORS off). */
  corsOrigins: string;
  /** Bearer tokens, as on the gRPC port (`Authorization: Bearer <token>`); /healthz stays open. */
  auth?: CallAuthenticator;
  /** HTTPS with the gRPC port's certificate (files read again when they change). */
  tls?: ServerTlsOptions;
  /** What /healthz reports (the gRPC server's state: false while draining); default always serving. */
  serving?: () => boolean;
}

/**
 * The gRPC method each route stands for (rights are granted per method). Every route but the
 * open ones (/healthz, CORS preflights) needs a token when tokens are configured; an unlisted
 * route needs the right to the whole service.
 */
const ROUTE_METHODS: Record<string, string> = {
  'POST /v1/segment': 'cfrsam.v1.Segmentation/Segment',
  'POST /v1/segment/geojson': 'cfrsam.v1.Segmentation/Segment',
  'POST /v1/refine': 'cfrsam.v1.Segmentation/Refine',
  'GET /v1/model': 'cfrsam.v1.Segmentation/GetModelInfo',
};

/** An HTTPS server whose certificate is read again when its files change. */
function httpsServer(tls: ServerTlsOptions, handler: http.RequestListener): https.Server {
  const contextOptions = () => ({
    cert: fs.readFileSync(tls.certFile),
    key: fs.readFileSync(tls.keyFile),
    ...(tls.clientCaFile ? { ca: fs.readFileSync(tls.clientCaFile), requestCert: true, rejectUnauthorized: true } : {}),
  });
  const server = https.createServer(contextOptions(), handler);
  const reload = () => {
    try {
      server.setSecureContext(contextOptions());
    } catch (err) {
      logger().error(`gateway http: keeping the previous certificate: ${(err as Error).message}`);
    }
  };
  const interval = tls.refreshIntervalMs ?? 60_000;
  for (const file of [tls.certFile, tls.keyFile, tls.clientCaFile]) if (file) fs.watchFile(file, { interval, persistent: false }, reload);
  server.on('close', () => {
    for (const file of [tls.certFile, tls.keyFile, tls.clientCaFile]) if (file) fs.unwatchFile(file, reload);
  });
  return server;
}

export interface RunningHttpGateway {
  port: number;
  close(): Promise<void>;
}

/** The HTTP status for a gRPC status code (as grpc-gateway maps them). */
export function httpStatusOf(code: number): number {
  switch (code) {
    case status.OK:
      return 200;
    case status.INVALID_ARGUMENT:
    case status.FAILED_PRECONDITION:
    case status.OUT_OF_RANGE:
      return 400;
    case status.UNAUTHENTICATED:
      return 401;
    case status.PERMISSION_DENIED:
      return 403;
    case status.NOT_FOUND:
      return 404;
    case status.ALREADY_EXISTS:
    case status.ABORTED:
      return 409;
    case status.RESOURCE_EXHAUSTED:
      return 429;
    case status.CANCELLED:
      return 499;
    case status.UNIMPLEMENTED:
      return 501;
    case status.UNAVAILABLE:
      return 503;
    case status.DEADLINE_EXCEEDED:
      return 504;
    default:
      return 500;
  }
}

class HttpError extends Error {
  constructor(
    readonly httpStatus: number,
    message: string,
  ) {
    super(message);
  }
}

function readBody(req: http.IncomingMessage, limit: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) {
        reject(new HttpError(413, `request body over the limit of ${limit} bytes`));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function parseJson(body: Buffer): unknown {
  if (body.length === 0) throw new HttpError(400, 'empty body: send the request as JSON');
  try {
    return JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw new HttpError(400, `body is not JSON: ${(err as Error).message}`);
  }
}

/** Fields of the request messages that carry bytes: base64 strings in JSON (proto3's JSON mapping). */
const BYTES_FIELDS = ['image'] as const;

/**
 * The body as a request message. ts-proto's fromJSON trusts the JSON's types (a number where
 * base64 bytes belong throws a TypeError deep inside it), so the shape is checked here first and
 * anything it still refuses is the caller's mistake, answered 400 with what was wrong.
 */
function parseRequest<T>(message: { fromJSON(object: unknown): T }, name: string, body: Buffer): T {
  const object = parseJson(body);
  if (typeof object !== 'object' || object === null || Array.isArray(object)) {
    throw new HttpError(
      400,
      `the body must be a JSON object (a ${name}), got ${object === null ? 'null' : Array.isArray(object) ? 'an array' : typeof object}`,
    );
  }
  for (const field of BYTES_FIELDS) {
    const value = (object as Record<string, unknown>)[field];
    if (value !== undefined && value !== null && typeof value !== 'string') {
      throw new HttpError(400, `${field} must be the file's bytes as a base64 string, got ${Array.isArray(value) ? 'an array' : typeof value}`);
    }
  }
  try {
    return message.fromJSON(object);
  } catch (err) {
    throw new HttpError(400, `the body is not a valid ${name}: ${(err as Error).message}`);
  }
}

export function startHttpGateway(pipeline: SegmentationPipeline, options: HttpGatewayOptions): Promise<RunningHttpGateway> {
  const allowed = listFlag(options.corsOrigins);
  const cors = (req: http.IncomingMessage, res: http.ServerResponse) => {
    const origin = req.headers.origin;
    if (!origin || allowed.length === 0) return;
    if (allowed.includes('*') || allowed.includes(origin)) {
      res.setHeader('access-control-allow-origin', allowed.includes('*') ? '*' : origin);
      res.setHeader('access-control-allow-methods', 'GET, POST, OPTIONS');
      res.setHeader('access-control-allow-headers', 'content-type, x-timeout-ms, authorization');
      res.setHeader('access-control-max-age', '600');
      res.setHeader('vary', 'origin');
    }
  };
  const send = (res: http.ServerResponse, code: number, body: unknown, headers: Record<string, string> = {}) => {
    const text = JSON.stringify(body);
    res.writeHead(code, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), ...headers });
    res.end(text);
  };

  const handler: http.RequestListener = (req, res) => {
    cors(req, res);
    const controller = new AbortController();
    res.on('close', () => {
      if (!res.writableFinished) controller.abort(new Error('client went away'));
    });
    const timeoutMs = Number(req.headers['x-timeout-ms'] ?? 0);
    // The caller, as on the gRPC port (identity.ts): the verified token's identity, else the
    // self-declared x-client-id, else the peer's address.
    const declared = req.headers['x-client-id'];
    const ctx = {
      signal: controller.signal,
      deadline: timeoutMs > 0 ? new Date(Date.now() + timeoutMs) : undefined,
      identity:
        typeof declared === 'string' && declared.length > 0 && declared.length <= 128
          ? `client:${declared}`
          : `peer:${req.socket.remoteAddress ?? 'unknown'}`,
    };
    // As on the gRPC port (admission/door.ts): a request announcing its image's size in
    // X-Image-Size is priced from its headers, before its body is read, and refused at once or
    // its place held.
    const reserveAnnounced = (): AdmissionReservation | undefined => {
      const announced = announcedSize((name) => req.headers[name]);
      return announced ? pipeline.reserveAnnounced(announced, ctx.identity, ctx.deadline?.getTime()) : undefined;
    };
    const route = `${req.method} ${(req.url ?? '').split('?')[0]}`;
    const open = route === 'GET /healthz' || req.method === 'OPTIONS';
    // As on the gRPC port: a server span in the caller's trace (W3C traceparent header) and one
    // request line, for every call but probes and preflights.
    const started = performance.now();
    let authenticated = false;
    let outcome = 'OK';
    const span = open
      ? trace.wrapSpanContext(INVALID_SPAN_CONTEXT)
      : getTracer().startSpan(
          route,
          { kind: SpanKind.SERVER, attributes: { 'http.request.method': req.method ?? '', 'http.route': route.split(' ')[1] } },
          propagation.extract(ROOT_CONTEXT, req.headers),
        );
    if (!open) {
      res.on('close', () => {
        span.setAttribute('http.response.status_code', res.statusCode);
        span.setAttribute('enduser.id', ctx.identity);
        if (res.statusCode >= 500) span.setStatus({ code: SpanStatusCode.ERROR, message: outcome });
        span.end();
        const { traceId, spanId } = span.spanContext();
        const durationMs = performance.now() - started;
        logRequest({ method: route, identity: ctx.identity, authenticated, code: outcome, durationMs, traceId, spanId }, res.statusCode >= 500);
      });
    }
    context
      .with(trace.setSpan(context.active(), span), async () => {
        if (!open && options.auth?.enabled) {
          const method = ROUTE_METHODS[route] ?? 'cfrsam.v1.Segmentation/*';
          const identity = options.auth.authenticate(req.headers.authorization, method);
          if (identity instanceof Error) throw identity;
          ctx.identity = identity.id;
          authenticated = true;
        }
        switch (route) {
          case 'OPTIONS /v1/segment':
          case 'OPTIONS /v1/segment/geojson':
          case 'OPTIONS /v1/refine':
          case 'OPTIONS /v1/model':
            res.writeHead(204);
            res.end();
            return;
          case 'GET /healthz':
            // Probes (Kubernetes uses this one when the gRPC port serves TLS) see the drain.
            return options.serving?.() === false ? send(res, 503, { status: 'NOT_SERVING' }) : send(res, 200, { status: 'SERVING' });
          case 'GET /v1/model':
            return send(res, 200, segmentationProto.ModelInfo.toJSON(pipeline.modelInfo()));
          case 'POST /v1/segment': {
            const reservation = reserveAnnounced();
            try {
              const request = parseRequest(segmentationProto.SegmentRequest, 'cfrsam.v1.SegmentRequest', await readBody(req, options.maxBodyBytes));
              return send(
                res,
                200,
                segmentationProto.SegmentResponse.toJSON(await pipeline.segment(request, { ...ctx, reservation: reservation?.id })),
              );
            } finally {
              reservation?.release();
            }
          }
          case 'POST /v1/segment/geojson': {
            // The same request; the answer is QuPath GeoJSON in the slide's coordinates (the
            // request's origin and downsample), classes mapped by ?classes=model=QuPath,...
            let classMap;
            const query = new URL(req.url ?? '/', 'http://localhost').searchParams;
            try {
              classMap = parseQuPathClassMap(query.get('classes') ?? '');
            } catch (err) {
              throw new HttpError(400, `classes: ${(err as Error).message}`);
            }
            // ?cells=UM grows each nucleus into a QuPath cell object (the request's cell_expansion_um).
            const cellsUm = Number(query.get('cells') ?? 0);
            if (!Number.isFinite(cellsUm) || cellsUm < 0) throw new HttpError(400, `cells must be a distance in µm >= 0, got ${query.get('cells')}`);
            const reservation = reserveAnnounced();
            let response: segmentationProto.SegmentResponse;
            try {
              const request = parseRequest(segmentationProto.SegmentRequest, 'cfrsam.v1.SegmentRequest', await readBody(req, options.maxBodyBytes));
              response = await pipeline.segment(
                {
                  ...request,
                  returnLabelMap: false,
                  returnMasks: false,
                  labelMapEncoding: undefined,
                  cellExpansionUm: cellsUm > 0 ? cellsUm : request.cellExpansionUm,
                },
                { ...ctx, reservation: reservation?.id },
              );
            } finally {
              reservation?.release();
            }
            return send(res, 200, segmentResponseToGeoJson(response, pipeline.modelInfo().classes, classMap));
          }
          case 'POST /v1/refine': {
            const request = parseRequest(segmentationProto.RefineRequest, 'cfrsam.v1.RefineRequest', await readBody(req, options.maxBodyBytes));
            return send(res, 200, segmentationProto.SegmentResponse.toJSON(await pipeline.refine(request, ctx)));
          }
          default:
            throw new HttpError(
              404,
              `no route ${route}; routes: POST /v1/segment, POST /v1/segment/geojson, POST /v1/refine, GET /v1/model, GET /healthz`,
            );
        }
      })
      .catch((err: unknown) => {
        if (res.headersSent) return res.destroy();
        if (err instanceof HttpError) {
          outcome = `HTTP_${err.httpStatus}`;
          return send(res, err.httpStatus, { code: -1, status: 'HTTP', message: err.message });
        }
        const e = toServiceError(err);
        outcome = status[e.code];
        const details = errorDetailsOf(e);
        const headers: Record<string, string> = {};
        if (details.retryDelayMs !== undefined) headers['retry-after'] = String(Math.max(1, Math.ceil(details.retryDelayMs / 1000)));
        if (e.code === status.UNAUTHENTICATED) headers['www-authenticate'] = 'Bearer';
        send(res, httpStatusOf(e.code), { code: e.code, status: status[e.code], message: e.details, details }, headers);
      });
  };
  const server = options.tls ? httpsServer(options.tls, handler) : http.createServer(handler);
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port, options.host ?? '0.0.0.0', () => {
      resolve({
        port: (server.address() as AddressInfo).port,
        close: () => new Promise<void>((done) => server.close(() => done())),
      });
    });
  });
}
