// The gRPC bootstrap over loopback: health, reflection, error-to-status mapping, deadlines, trace
// propagation, service metrics and graceful shutdown. The handlers are written here to drive each
// case; the services' own tests cover the real stage handlers.
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import { credentials, loadPackageDefinition, makeGenericClientConstructor, Metadata, type ServiceError } from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { context, trace } from '@opentelemetry/api';
import { service as healthService } from 'grpc-health-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type CallContext,
  callOptionsFromDeadline,
  grpcError,
  inFlightCalls,
  initServiceMetrics,
  initTracing,
  makeClient,
  type RunningServer,
  type SpanRecord,
  stagesProto,
  startServer,
  status,
  unary,
  unaryHandler,
} from '@cfrsam/rpc';
import { TensorShapeError } from '@cfrsam/contract';
import { freePort } from '@cfrsam/testing';

const traceDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-server-test-'));
const traceFile = path.join(traceDir, 'spans.jsonl');
afterAll(() => fs.rmSync(traceDir, { recursive: true, force: true }));
const tracing = initTracing({ serviceName: 'server-test', exporter: 'memory', traceFile });

let lastContext: CallContext | undefined;

/** Detect handler whose behaviour is picked by the first tile's digest. */
const detect = unaryHandler('cfrsam.v1.Prompter/Detect', async (request: stagesProto.DetectRequest, ctx) => {
  lastContext = ctx;
  const mode = request.tiles[0]?.digest ?? '';
  if (mode === 'status') throw grpcError(status.FAILED_PRECONDITION, 'not prepared');
  if (mode === 'shape') throw new TensorShapeError('tiles[0].pixels: expected dims [3,256,256], got [3,2,2]');
  if (mode === 'bug') throw new TypeError('cannot read x of undefined');
  if (mode === 'child-cancelled') {
    // What a stage adapter does when the call's abort cancelled its child call: a StatusError
    // CANCELLED naming the stage.
    await new Promise((resolve) => ctx.signal.addEventListener('abort', resolve));
    throw grpcError(status.CANCELLED, 'decoder: 1 CANCELLED: Cancelled on client');
  }
  if (mode.startsWith('slow')) {
    await new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, Number(mode.slice(4)));
      ctx.signal.addEventListener('abort', () => {
        clearTimeout(timer);
        reject(new Error('aborted'));
      });
    });
  }
  return { tiles: [{ digest: mode, detections: [] }] };
});

describe('startServer', () => {
  let running: RunningServer;
  let client: stagesProto.PrompterClient;
  let metricsPort: number;
  let shutdownHookCalls = 0;

  beforeAll(async () => {
    metricsPort = await freePort();
    await initServiceMetrics({ serviceName: 'server-test', port: metricsPort, host: '127.0.0.1' });
    running = await startServer({
      name: 'test',
      port: 0,
      host: '127.0.0.1',
      services: [{ name: 'cfrsam.v1.Prompter', definition: stagesProto.PrompterService, implementation: { detect } }],
      shutdownGraceMs: 5_000,
      onShutdown: () => {
        shutdownHookCalls++;
      },
      log: () => {},
    });
    client = makeClient(stagesProto.PrompterClient, running.address);
  });
  afterAll(async () => {
    client?.close();
    await running?.shutdown();
  });

  const call = (digest: string, options: Parameters<typeof unary>[3] = {}) =>
    unary(client, client.detect, { tiles: [{ digest }], minForeground: 0, nmsRadius: 0, modelVersion: '' }, options);

  it('answers grpc.health.v1 per service and follows setServing', async () => {
    const Health = makeGenericClientConstructor(healthService, 'grpc.health.v1.Health');
    const health = new Health(running.address, credentials.createInsecure()) as any;
    const check = (service: string) =>
      new Promise<string>((resolve, reject) =>
        health.check({ service }, (err: ServiceError | null, res: { status: string }) => (err ? reject(err) : resolve(res.status))),
      );
    expect(await check('')).toBe('SERVING');
    expect(await check('cfrsam.v1.Prompter')).toBe('SERVING');
    running.setServing(false);
    expect(await check('cfrsam.v1.Prompter')).toBe('NOT_SERVING');
    running.setServing(true);
    await expect(check('cfrsam.v1.Nope')).rejects.toMatchObject({ code: status.NOT_FOUND });
    health.close();
  });

  it('serves reflection for the cfrsam and health services', async () => {
    const reflectionProto = path.join(
      path.dirname(require.resolve('@grpc/reflection')),
      '..',
      'proto',
      'grpc',
      'reflection',
      'v1',
      'reflection.proto',
    );
    const pkg = loadPackageDefinition(protoLoader.loadSync(reflectionProto, { keepCase: true })) as any;
    const reflection = new pkg.grpc.reflection.v1.ServerReflection(running.address, credentials.createInsecure());
    const stream = reflection.ServerReflectionInfo();
    const names = await new Promise<string[]>((resolve, reject) => {
      stream.on('data', (res: any) => resolve(res.list_services_response.service.map((s: { name: string }) => s.name)));
      stream.on('error', reject);
      stream.write({ list_services: '' });
    });
    stream.end();
    reflection.close();
    expect(names).toEqual(expect.arrayContaining(['cfrsam.v1.Prompter', 'cfrsam.v1.Encoder', 'cfrsam.v1.Decoder', 'grpc.health.v1.Health']));
  });

  it('maps thrown errors to statuses with their messages and keeps serving', async () => {
    await expect(call('status')).rejects.toMatchObject({ code: status.FAILED_PRECONDITION, details: 'not prepared' });
    await expect(call('shape')).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: 'tiles[0].pixels: expected dims [3,256,256], got [3,2,2]',
    });
    const original = console.error;
    console.error = () => {}; // the INTERNAL case is logged as a bug; keep the test output clean
    try {
      await expect(call('bug')).rejects.toMatchObject({ code: status.INTERNAL, details: 'internal error: cannot read x of undefined' });
    } finally {
      console.error = original;
    }
    await expect(call('fine')).resolves.toMatchObject({ tiles: [{ digest: 'fine' }] });
  });

  it('passes the deadline to the handler and aborts its signal when it passes', async () => {
    const deadline = Date.now() + 150;
    await expect(call('slow5000', { deadline })).rejects.toMatchObject({ code: status.DEADLINE_EXCEEDED });
    expect(lastContext!.deadline!.getTime()).toBeGreaterThan(deadline - 1000);
    expect(lastContext!.deadline!.getTime()).toBeLessThanOrEqual(deadline + 1000);
    await new Promise((r) => setTimeout(r, 50));
    expect(lastContext!.signal.aborted).toBe(true);
    const earlier = new Date(Date.now() + 1000);
    expect(callOptionsFromDeadline(earlier, 60_000).deadline).toEqual(earlier);
    expect(callOptionsFromDeadline(undefined, undefined)).toEqual({});
  });

  /** The server-side count of Detect calls answered with `code` (cfrsam_rpc_duration_seconds). */
  async function answered(code: string): Promise<number> {
    const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    const line = text.split('\n').find((l) => l.startsWith('cfrsam_rpc_duration_seconds_count{') && l.includes(`code="${code}"`));
    return line ? Number(line.split(' ').pop()) : 0;
  }

  it('answers DEADLINE_EXCEEDED when the deadline passed, CANCELLED only when the client cancelled', async () => {
    const before = { deadline: await answered('DEADLINE_EXCEEDED'), cancelled: await answered('CANCELLED') };
    // The handler fails with its child call's CANCELLED after the deadline aborted it.
    await expect(call('child-cancelled', { deadline: Date.now() + 150 })).rejects.toMatchObject({ code: status.DEADLINE_EXCEEDED });
    await new Promise((r) => setTimeout(r, 100));
    expect(await answered('DEADLINE_EXCEEDED')).toBe(before.deadline + 1);
    expect(await answered('CANCELLED')).toBe(before.cancelled);
    // The client cancels: the same failure is CANCELLED.
    const controller = new AbortController();
    const cancelled = call('child-cancelled', { deadline: Date.now() + 10_000, signal: controller.signal });
    setTimeout(() => controller.abort(), 100);
    await expect(cancelled).rejects.toMatchObject({ code: status.CANCELLED });
    await new Promise((r) => setTimeout(r, 100));
    expect(await answered('CANCELLED')).toBe(before.cancelled + 1);
    expect(await answered('DEADLINE_EXCEEDED')).toBe(before.deadline + 1);
  });

  it('names the caller: ctx.identity from x-client-id, else the peer host', async () => {
    const metadata = new Metadata();
    metadata.set('x-client-id', 'lab-7');
    await call('fine', { metadata });
    expect(lastContext!.identity).toMatchObject({ id: 'client:lab-7', authenticated: false });
    await call('fine');
    expect(lastContext!.identity.id).toBe('peer:127.0.0.1');
  });

  it('continues the caller trace: the server span is a child of the client span', async () => {
    const parent = tracing.tracer.startSpan('test.parent');
    await context.with(trace.setSpan(context.active(), parent), () => call('traced', { attributes: { 'cfrsam.tiles': 1 } }));
    parent.end();
    const spans = tracing.memoryExporter!.getFinishedSpans();
    const server = spans.find((s) => s.name === 'cfrsam.v1.Prompter/Detect' && lastContext?.span.spanContext().spanId === s.spanContext().spanId)!;
    const clientSpan = spans.find(
      (s) => s.name === 'cfrsam.v1.Prompter/Detect' && s !== server && s.spanContext().traceId === parent.spanContext().traceId,
    )!;
    expect(server.spanContext().traceId).toBe(parent.spanContext().traceId);
    expect(server.parentSpanContext?.spanId).toBe(clientSpan.spanContext().spanId);
    expect(clientSpan.parentSpanContext?.spanId).toBe(parent.spanContext().spanId);
    // The same spans went to the trace file as JSON lines.
    const records = fs
      .readFileSync(traceFile, 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as SpanRecord);
    const fileServer = records.find((r) => r.spanId === server.spanContext().spanId)!;
    expect(fileServer).toMatchObject({ service: 'server-test', kind: 'SERVER', parentSpanId: clientSpan.spanContext().spanId });
  });

  it('exports service metrics for Prometheus', async () => {
    await call('fine');
    const text = await new Promise<string>((resolve, reject) => {
      http
        .get(`http://127.0.0.1:${metricsPort}/metrics`, (res) => {
          let body = '';
          res.on('data', (chunk) => (body += chunk));
          res.on('end', () => resolve(body));
        })
        .on('error', reject);
    });
    expect(text).toMatch(/cfrsam_rpc_duration_seconds_bucket\{.*method="cfrsam.v1.Prompter\/Detect"/);
    expect(text).toMatch(/cfrsam_in_flight_calls\{/);
  });

  it('drains an in-flight call on shutdown, then refuses new calls', async () => {
    const inFlight = call('slow300', { timeoutMs: 10_000 });
    while (inFlightCalls() === 0) await new Promise((r) => setTimeout(r, 5));
    const stopped = running.shutdown('test shutdown');
    await expect(inFlight).resolves.toMatchObject({ tiles: [{ digest: 'slow300' }] });
    await stopped;
    expect(shutdownHookCalls).toBe(1);
    await expect(call('late', { timeoutMs: 2_000 })).rejects.toMatchObject({ code: expect.any(Number) });
    const err = (await call('late', { timeoutMs: 2_000 }).catch((e) => e)) as ServiceError;
    expect([status.UNAVAILABLE, status.DEADLINE_EXCEEDED]).toContain(err.code);
  });
});
